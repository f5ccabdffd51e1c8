"""API benchmark: the OpenAI-compatible server (engine.serve) under 1, 4 and 8 concurrent
streaming clients, per backend: aggregate reply tokens per second, p50/p95 time to first
token, errors.

    python -m bench.bench_serve [--run runs/<id>] [--backends onnx-fp32,onnx-int4,tuned]

Without --run it uses bench.bench_inference's demo run (embedded SmolLM2-135M + a random
LoRA adapter), exported to ONNX fp32 and int4 when those exports are missing. Each backend
is served alone on a loopback port (uvicorn in this process, the engine's one scheduler
behind it, API concurrency 8 so that every client is admitted); each client sends
``--requests`` streamed greedy chats one after another (``max_tokens`` = --new-tokens,
``stream_options.include_usage`` for the token count) through the ``openai`` client.
Aggregate tokens/s = all reply tokens / the level's wall time. Writes bench/results/serve.json
and serve.md.
"""

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Describe how a bicycle works.",
    "Summarise the plot of a detective story in four sentences.",
    "Why do we need sleep?",
    "List some uses of baking soda.",
]


def _serve(api):
    import uvicorn

    from engine import serve

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(serve.build_server_app(api), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def _one_chat(client, model: str, prompt: str, new_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    tokens = 0
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=new_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return {"ttft_s": first, "tokens": tokens, "error": None}
    except Exception as err:  # noqa: BLE001 - counted and reported in the table
        return {"ttft_s": first, "tokens": tokens, "error": f"{type(err).__name__}: {err}"}


def measure(url: str, model: str, clients: int, requests: int, new_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    def worker(i: int) -> list[dict]:
        return [
            _one_chat(client, model, PROMPTS[(i + k * clients) % len(PROMPTS)], new_tokens) for k in range(requests)
        ]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    tokens = sum(r["tokens"] for r in results)
    errors = [r["error"] for r in results if r["error"]]
    return {
        "clients": clients,
        "replies": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3) if ttfts else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def to_markdown(result: dict) -> str:
    lines = [
        "## API under concurrent streaming clients (tunelab serve)",
        "",
        f"{result['run']}; greedy replies of at most {result['new_tokens']} tokens, "
        f"{result['requests']} per client; machine: {result['machine'].get('cpu', '?')}, "
        f"load average before {result['machine'].get('load_average_before')}.",
        "",
        "| backend | clients | replies | tokens | aggregate tokens/s | x one client | TTFT p50 | TTFT p95 | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, rows in result["backends"].items():
        one = rows[0]["aggregate_tokens_per_s"] or 1.0
        for row in rows:
            lines.append(
                f"| {backend} | {row['clients']} | {row['replies']} | {row['tokens']} | "
                f"{row['aggregate_tokens_per_s']} | {row['aggregate_tokens_per_s'] / one:.2f} | "
                f"{row['ttft_p50_s']} s | {row['ttft_p95_s']} s | {row['errors']} |"
            )
    lines += ["", result.get("note", "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="Run directory (default: the demo LoRA run).")
    parser.add_argument("--backends", default="onnx-fp32,onnx-int4,tuned", help="Comma-separated backends.")
    parser.add_argument("--clients", default="1,4,8", help="Concurrent clients per level (default 1,4,8).")
    parser.add_argument("--requests", type=int, default=2, help="Chats per client per level (default 2).")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_tokens per reply (default 64).")
    parser.add_argument("--work", default=None, help="Keep the demo run here (reused next time).")
    parser.add_argument("--out", default=str(RESULTS), help="Directory for serve.json / serve.md.")
    args = parser.parse_args(argv)

    from bench.bench_inference import make_demo_run
    from bench.machine import describe, write_results
    from engine import export, inference, serve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run:
        run_dir = Path(args.run)
    else:
        root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tunelab-bench-serve-"))
        run_dir = root / "bench-lora"
        if not (run_dir / "config.yaml").is_file():
            print("Making a demo run: embedded SmolLM2-135M + a random LoRA adapter...", flush=True)
            run_dir = make_demo_run(root)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend.startswith("onnx-") and not (run_dir / "export" / backend / "genai_config.json").is_file():
            print(f"Exporting {backend}...", flush=True)
            export.export_onnx(run_dir, backend.removeprefix("onnx-"), progress=lambda m: print(m, flush=True))
    levels = [int(c) for c in args.clients.split(",")]
    result = {
        "run": str(run_dir) if args.run else "demo: smollm2-135m-instruct + random LoRA r=16",
        "new_tokens": args.new_tokens,
        "requests": args.requests,
        "machine": {**describe(), "load_average_before": [round(x, 2) for x in os.getloadavg()]},
        "backends": {},
    }
    for backend in backends:
        api = serve.Api(serve.OneModel(run_dir, backend), serve.StaticKey(None), concurrency=max(levels))
        server, thread, url = _serve(api)
        try:
            model = f"{run_dir.name}:{backend}"
            print(f"{backend}: warming up...", flush=True)
            measure(url, model, 1, 1, 8)
            rows = []
            for clients in levels:
                row = measure(url, model, clients, args.requests, args.new_tokens)
                print(f"{backend} x{clients}: {row}", flush=True)
                rows.append(row)
            result["backends"][backend] = rows
        finally:
            server.should_exit = True
            thread.join(30)
            inference.unload_all()
    write_results(args.out, "serve", result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
