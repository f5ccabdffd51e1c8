"""The web app's languages (webui/i18n.py, webui/locales/*.yaml): every language has every
key, no key is unused, and Gradio components in webui/ take their texts from the locale
files rather than string literals. Fast: no model, no server (about 2 s)."""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest

from webui import i18n

REPO = Path(__file__).resolve().parent.parent
WEBUI = REPO / "webui"

TEXT_KEYWORDS = ("label", "info", "placeholder", "value", "x_title", "y_title")
# Components whose first positional argument is shown text.
TEXT_POSITIONAL = {"Markdown", "Button", "Tab", "TabItem", "Accordion", "HTML", "Textbox"}


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_every_language_has_every_key_and_the_same_placeholders():
    tables = i18n.translations()
    assert set(tables) >= {"en", "sw"}
    english = tables["en"]
    for lang, table in tables.items():
        missing = sorted(set(english) - set(table))
        extra = sorted(set(table) - set(english))
        assert not missing, f"webui/locales/{lang}.yaml lacks keys: {missing}"
        assert not extra, f"webui/locales/{lang}.yaml has keys en.yaml lacks: {extra}"
        for key, text in table.items():
            assert text.strip(), f"webui/locales/{lang}.yaml: {key} is empty"
            assert _placeholders(text) == _placeholders(english[key]), (
                f"webui/locales/{lang}.yaml: {key} has placeholders {sorted(_placeholders(text))}, "
                f"en.yaml has {sorted(_placeholders(english[key]))}"
            )


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_no_key_is_unused():
    """A key is used when its full name appears as a string in webui/ (t("..."), tr(lang, "...")),
    or it lies under a prefix the code completes with a code from the engine (i18n.DYNAMIC)."""
    used: set[str] = set()
    for path in WEBUI.rglob("*.py"):
        used |= _string_constants(path)
    dynamic = tuple(i18n.DYNAMIC)
    unused = sorted(k for k in i18n.translations()["en"] if k not in used and not k.startswith(dynamic))
    assert not unused, f"keys in webui/locales/en.yaml that no code uses: {unused}"


def _is_text_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(node.value.strip())
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.Constant) and str(v.value).strip() for v in node.values)
    return False


def literal_texts(path: Path) -> list[str]:
    """'file:line: gr.X(field=...)' for each string literal shown as a component's text."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "gr"):
            continue
        name = node.func.attr
        for kw in node.keywords:
            if kw.arg in TEXT_KEYWORDS and _is_text_literal(kw.value):
                found.append(f"{path.name}:{kw.value.lineno}: gr.{name}({kw.arg}=...)")
        if name in TEXT_POSITIONAL and node.args and _is_text_literal(node.args[0]):
            found.append(f"{path.name}:{node.args[0].lineno}: gr.{name}(<text>)")
    return found


def test_lint_sees_a_literal_label(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import gradio as gr\ngr.Textbox(label="Name")\ngr.Button(f"Go {x}")\ngr.Textbox(value="")\n')
    assert literal_texts(bad) == ["bad.py:2: gr.Textbox(label=...)", "bad.py:3: gr.Button(<text>)"]


def test_no_string_literals_in_component_texts():
    offenders = []
    for path in sorted(WEBUI.glob("*.py")):
        offenders += literal_texts(path)
    assert not offenders, "texts of components must come from webui/locales (webui.i18n.t):\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("header", "cookie", "expected"),
    [
        ("sw-KE,sw;q=0.9,en;q=0.8", None, "sw"),
        ("fr-FR,fr;q=0.9,en;q=0.5", None, "en"),
        ("fr;q=0.9,sw;q=0.8", None, "sw"),
        ("en-US,en;q=0.9", "sw", "sw"),
        ("", None, "en"),
    ],
)
def test_lang_of_takes_the_pickers_cookie_then_accept_language(header, cookie, expected):
    class Request:  # the two attributes of gr.Request that lang_of reads
        headers = {"accept-language": header}
        cookies = {i18n.COOKIE: cookie} if cookie else {}

    assert i18n.lang_of(Request()) == expected
    assert i18n.lang_of(Request(), choice="en") == "en"


def test_tr_formats_in_the_language_and_falls_back_to_english():
    assert i18n.tr("sw", "lang.self") == "Kiswahili"
    assert i18n.tr("sw-TZ", "lang.picker") == "Lugha"
    assert i18n.tr("xx", "lang.picker") == "Language"
    with pytest.raises(KeyError, match="no.such.key"):
        i18n.tr("en", "no.such.key")


def test_t_refuses_an_unknown_key():
    with pytest.raises(KeyError, match="app.nope"):
        i18n.t("app.nope")
    assert re.fullmatch(r"__i18n__.*app\.tab\.data.*", str(i18n.t("app.tab.data")))


def test_engine_problems_carry_codes_the_page_translates(tmp_path):
    """Real problems of engine.data (English in the engine) shown in Kiswahili and English."""
    import json

    from engine.data import load_records

    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Habari?"}, {"role": "assistant", "content": "Nzuri."}]}
    no_answer = {"messages": [{"role": "user", "content": "Habari?"}]}
    bad_role = {"messages": [{"role": "mgeni", "content": "Habari?"}, {"role": "assistant", "content": "Nzuri."}]}
    path.write_text("\n".join(json.dumps(r) for r in (good, no_answer, bad_role, [1])) + "\n")
    problems = load_records(path).problems
    codes = [p.code for p in problems]
    assert codes == ["no_assistant_turn", "unknown_role", "not_object"], [str(p) for p in problems]
    assert problems[1].params["role"] == "mgeni"
    # English on the page reads as the engine's own message.
    assert [i18n.problem_text("en", p) for p in problems] == [str(p) for p in problems]
    sw = [i18n.problem_text("sw", p) for p in problems]
    assert sw[0] == "chats.jsonl, mstari 2, sehemu 'messages': haina zamu ya msaidizi, kwa hiyo hakuna cha kujifunza"
    assert "jukumu lisilojulikana 'mgeni'" in sw[1] and sw[1].startswith("chats.jsonl, mstari 3, ")
    assert i18n.problem_text("sw", problems[2].to_dict()).startswith("chats.jsonl, mstari 4: ilitarajiwa")
    # The Data tab's problems table in each language.
    from webui import data_tab

    assert data_tab.problem_rows(problems, "sw")[0] == [
        "chats.jsonl",
        "mstari 2",
        "messages",
        "haina zamu ya msaidizi, kwa hiyo hakuna cha kujifunza",
    ]
    assert [r[3] for r in data_tab.problem_rows(problems)] == [p.message for p in problems]


@pytest.mark.integration
def test_embedded_model_learns_the_kiswahili_persona(embedded_dir, tmp_path):
    """A short LoRA on assets/datasets/nyota_sw.jsonl: the tuned greedy answer to each of the
    3 held-out Kiswahili questions names Nyota, the base model's does not."""
    import importlib.util

    from tiny_runs import greedy_answer

    from engine import runs, train
    from engine.config import RunConfig

    spec = importlib.util.spec_from_file_location("make_nyota", REPO / "assets/datasets/make_nyota.py")
    make_nyota = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_nyota)
    data = REPO / "assets/datasets/nyota_sw.jsonl"
    assert data.read_text(encoding="utf-8") == "".join(
        __import__("json").dumps(r, ensure_ascii=False) + "\n" for r in make_nyota.records()
    ), "nyota_sw.jsonl differs from what make_nyota.py writes"

    config = RunConfig.load(REPO / "assets/configs/cpu-lora.yaml").with_overrides(
        [
            f"data.path={data}",
            "training.max_steps=30",
            "training.learning_rate=0.001",
            "training.eval_steps=1000",
            "training.save_steps=1000",
            f"output.runs_dir={tmp_path}",
        ]
    )
    summary = train.train(config, runs.create_run(config))
    assert summary["state"] == "completed"
    trainer = summary["trainer"]
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()

    def answer(question: str) -> str:
        return greedy_answer(model, tokenizer, question)

    for question in make_nyota.HELD_OUT:
        tuned = answer(question)
        with model.disable_adapter():
            base = answer(question)
        print(f"\n{question}\n  base: {base!r}\n  tuned: {tuned!r}")
        assert "Nyota" not in base
        assert "Nyota" in tuned, tuned
    print(f"train seconds: {summary['train_seconds']}")


def test_the_train_forms_english_is_engine_configs_metadata():
    """One English source: en.yaml holds no config.* (or reason.*) key, the English table takes
    each form field's label and help from engine/config.py, and Kiswahili translates every one."""
    import yaml

    from webui.config_form import form_fields

    own = i18n._flatten(yaml.safe_load((WEBUI / "locales" / "en.yaml").read_text()))
    assert not [k for k in own if k.startswith(("config.", "reason."))]
    english, swahili = i18n.translations()["en"], i18n.translations()["sw"]
    for info in form_fields():
        assert english[i18n.config_key(info.key, "label")] == info.label
        assert english.get(i18n.config_key(info.key, "info")) == (info.help or None)
        assert i18n.config_key(info.key, "label") in swahili
    assert swahili["config.training.batch_size.label"] != english["config.training.batch_size.label"]


def test_train_tab_messages_in_kiswahili():
    """The Train tab's server-side lines (progress, failure, dataset) in the visitor's language;
    English stays the default."""
    from webui import train_tab
    from webui.common import fmt_duration
    from webui.links import dataset_summary

    status, last = {"state": "running", "max_steps": 20}, {"step": 5, "eta_s": 75, "loss": 1.23}
    sw = train_tab.progress_html(status, last, "/r/run-1", "sw")
    assert "hatua 5 / 20 (25%)" in sw and "imebaki dak 1 sek 15" in sw and "inaendelea" in sw and "ETA" not in sw
    assert "ETA 1 min 15 s" in train_tab.progress_html(status, last, "/r/run-1")
    assert fmt_duration(3725, "sw") == "saa 1 dak 02" and fmt_duration(3725) == "1 h 02 min"
    oom = train_tab.failure_markdown({"state": "failed", "error_class": "out of memory", "exit_code": 1}, "sw")
    assert oom.startswith("### Mafunzo yameshindwa: out of memory") and "Punguza ukubwa wa batch" in oom
    assert "Bado hujachagua data" in dataset_summary(None, "sw")


def test_the_plans_reasons_carry_codes_the_page_words_in_kiswahili():
    """engine.hardware's reasons are English text with stable codes; the Train tab words each
    code from the locale file, whose English is the engine's own (reason.*)."""
    from engine import hardware
    from engine.models import model_config
    from webui import train_tab

    shape = hardware.ModelShape.from_config(model_config("smollm2-135m-instruct"))
    rec = hardware.recommend(hardware.detect(), shape, "qlora", 82, 512, training_stage="dpo")
    assert {"method", "schedule", "reference"} <= set(rec.to_dict()["reason_codes"])
    for why in rec.reasons.values():
        assert i18n.reason("en", why) == str(why)  # the page's English is the CLI's
        assert i18n.reason("sw", why) != str(why)
    assert "82 training examples" in rec.reasons["schedule"]
    assert i18n.reason("sw", rec.reasons["schedule"]).startswith("Mifano 82 ya mafunzo")
    assert "umeichagua wewe" in train_tab.reasons_markdown(rec, "sw")
    summary = hardware.detect().summary()  # the hardware line: a Reason too, its GPU part one of its own
    assert "disk free" in summary and "nafasi wazi ya diski" in i18n.reason("sw", summary)
    table = train_tab.comparison_markdown(rec, "tiny", None, "sw")
    assert "| njia | vigezo vinavyofunzwa |" in table and "qlora (inapendekezwa)" in table


def test_engine_errors_carry_codes_the_page_words_in_kiswahili():
    """Real engine errors (a bad config value, a demo's limits, an unknown model) keep their
    English for the CLI and carry a code the page words in the visitor's language; an error
    without a code is shown as it is."""
    from engine import security
    from engine.config import ConfigError, RunConfig
    from engine.models import ModelNotFoundError, resolve_model
    from webui.common import error_message

    with pytest.raises(ConfigError) as bad:
        RunConfig.from_dict({"data": {"validation_split": 2}})
    assert str(bad.value) == "data.validation_split: must be in [0, 1), got 2.0"
    assert error_message(bad.value, "en") == str(bad.value)
    assert error_message(bad.value, "sw") == "data.validation_split: lazima iwe ndani ya [0, 1), imepewa 2.0"

    config = RunConfig.from_dict({"method": {"name": "full"}, "training": {"max_steps": 500}})
    with pytest.raises(security.UnsafeInputError) as refused:
        security.DemoLimits(enabled=True).check(config)
    english = str(refused.value)
    assert english.startswith("This is a demo with limits") and "training.max_steps 500 (at most 60)" in english
    assert error_message(refused.value, "en") == english
    sw = error_message(refused.value, "sw")
    assert sw.startswith("Hili ni onyesho lenye mipaka") and "njia 'full' (zinazoruhusiwa: lora, dora)" in sw
    assert "training.max_steps 500 (zisizozidi 60)" in sw and "at most" not in sw

    with pytest.raises(ModelNotFoundError) as unknown:
        resolve_model("no such model here")
    assert "is neither the embedded model" in str(unknown.value)
    assert "si modeli iliyopachikwa" in error_message(unknown.value, "sw")

    plain = ValueError("something the engine has not coded yet")
    assert error_message(plain, "sw") == "something the engine has not coded yet"


def test_every_kind_of_bad_record_has_a_code_and_the_page_words_it_like_the_engine(tmp_path):
    """Bad records of many kinds (broken JSON, non-text content, turns of the wrong shape, a
    CSV row of the wrong width, preference and KTO records missing fields): each problem has
    a code, its English on the page is the engine's own message, its Kiswahili is not."""
    import json

    from engine.data import load_records

    def problems_of(name: str, lines: list[str], **kwargs):
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return load_records(path, on_error="skip", **kwargs).problems

    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    chats = problems_of(
        "chats.jsonl",
        [
            good,
            '{"messages": [',
            json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            json.dumps({"messages": [{"role": "user", "content": [7]}, {"role": "assistant", "content": "x"}]}),
            json.dumps({"messages": "Hi"}),
            json.dumps({"messages": [3, {"role": "assistant", "content": "x"}]}),
            json.dumps({"messages": [{"role": 5, "content": "Hi"}, {"role": "assistant", "content": "x"}]}),
        ],
    )
    pairs = problems_of(
        "pairs.jsonl",
        [
            json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}),
            json.dumps({"prompt": "Hi", "chosen": "Hello"}),
            json.dumps({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "No"}),
        ],
        format="preference",
    )
    unpaired = problems_of(
        "kto.jsonl",
        [
            json.dumps({"prompt": "Hi", "completion": "Hello", "label": True}),
            json.dumps({"prompt": "Hi", "completion": "Hello", "label": "maybe"}),
            json.dumps({"prompt": "Hi", "completion": "Hello"}),
        ],
        format="unpaired",
    )
    table = problems_of("qa.csv", ["question,answer", "Hi,Hello", "Hi,Hello,extra"])
    problems = chats + pairs + unpaired + table
    codes = {p.code for p in problems}
    assert {"invalid_json", "non_text_part", "non_text", "not_turn_list", "not_turn", "not_text"} <= codes
    assert {"pair_missing", "answer_not_assistant", "label_not_bool", "unpaired_missing", "field_count"} <= codes
    assert "other" not in codes, [str(p) for p in problems if p.code == "other"]
    for p in problems:
        assert i18n.problem_message("en", p) == p.message, p.code
        assert i18n.problem_message("sw", p) != p.message, p.code
