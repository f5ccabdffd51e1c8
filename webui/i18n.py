"""The web app's languages: one YAML file per language in webui/locales/ (adding a
language = adding one file), served through Gradio's own ``gr.I18n``.

Two ways a string reaches the page in the visitor's language:

- Static text of a component (``label=``, ``info=``, ``placeholder=``, ``value=`` of a
  Markdown, a Tab's name, a Button's text) is written as ``t("key")``: a ``gr.I18n`` key
  that the browser translates. Gradio 6.31 translates such keys in the *frontend* only:
  they are translated when they are a component's constructor argument, and also when a
  handler returns them as a whole value or inside ``gr.update(label=t(...))`` (the
  frontend walks the props it receives for I18nData markers). It does not translate a key
  embedded in a longer string or formatted with parameters.
- Messages with parameters (status lines, problems, reasons) are formatted on the server
  with :func:`tr` in the visitor's language, taken with :func:`lang_of` from the request
  (the picker's choice, kept in the ``tunelab_lang`` cookie, else Accept-Language).

The language follows the browser; the picker in the header (:func:`picker`) switches the
page at once and stores the choice per browser in localStorage (and a cookie the server
reads); see :func:`load_js` for why the page sets the language itself. No restart.

The CLI, the logs and ``--json`` stay English; the engine gives its messages stable codes
with parameters (e.g. ``engine.data.Problem.code``) that the page translates here.

Two parts of the English table are the engine's own text, not repeated in en.yaml (one
English source): the Train form's labels and help are engine/config.py's field metadata
(the text ``tunelab config`` prints), as ``config.<section>.<field>.label`` / ``.info``
(:func:`config_texts`); the recommendation's reasons are engine.hardware.REASON_TEXTS (what
``tunelab hardware`` prints), as ``reason.<code>`` (:func:`reason_texts`); the engine's
coded error messages are engine.messages.ERROR_TEXTS, as ``error.<code>``
(:func:`error_texts`, worded by :func:`engine_message`). The other languages translate those
keys like any other.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

LOCALES_DIR = Path(__file__).with_name("locales")
DEFAULT_LANG = "en"
COOKIE = "tunelab_lang"
STORAGE_KEY = "tunelab.lang"


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, full + "."))
        elif isinstance(value, str):
            out[full] = value
        else:
            raise ValueError(f"{LOCALES_DIR}: key {full!r} must map to text, got {type(value).__name__}")
    return out


@lru_cache(maxsize=1)
def translations() -> dict[str, dict[str, str]]:
    """{language code: {dotted key: text}} from every webui/locales/<code>.yaml."""
    import yaml

    out = {}
    for path in sorted(LOCALES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of keys to texts")
        out[path.stem] = _flatten(data)
    if DEFAULT_LANG not in out:
        raise FileNotFoundError(f"{LOCALES_DIR / (DEFAULT_LANG + '.yaml')} is missing")
    english = out[DEFAULT_LANG]
    repeated = sorted(k for k in english if k.startswith((CONFIG_PREFIX, REASON_PREFIX, ERROR_PREFIX)))
    if repeated:
        raise ValueError(
            f"{LOCALES_DIR / (DEFAULT_LANG + '.yaml')}: {repeated[0]} (and {len(repeated) - 1} more): the English "
            "of config.*, reason.* and error.* keys is the engine's text (engine/config.py, engine/hardware.py, "
            "engine/messages.py); do not repeat it"
        )
    english.update(config_texts())
    english.update(reason_texts())
    english.update(error_texts())
    return out


# The Train form's texts: English from engine/config.py's metadata (config_texts).
CONFIG_PREFIX = "config."


def config_key(key: str, part: str) -> str:
    """The i18n key of a config field's ``label`` or ``info``: 'config.training.batch_size.label'."""
    return f"{CONFIG_PREFIX}{key}.{part}"


REASON_PREFIX = "reason."


def reason_texts() -> dict[str, str]:
    """{reason key: English text} of every reason the hardware plan gives (engine.hardware)."""
    from engine.hardware import REASON_TEXTS

    return {REASON_PREFIX + code: text for code, text in REASON_TEXTS.items()}


def reason(lang: str | None, why) -> str:
    """A reason of the plan (engine.hardware.Reason) in ``lang``; plain text stays as it is."""
    parts = getattr(why, "parts", None)
    if not parts:
        return str(why or "")
    return " ".join(
        tr(lang, REASON_PREFIX + code, **{k: reason(lang, v) for k, v in params.items()}) for code, params in parts
    )


ERROR_PREFIX = "error."


def error_texts() -> dict[str, str]:
    """{error key: English text} of every coded engine message (engine.messages)."""
    from engine.messages import ERROR_TEXTS

    return {ERROR_PREFIX + code: text for code, text in ERROR_TEXTS.items()}


def engine_message(lang: str | None, err: BaseException) -> str | None:
    """An engine exception's coded message (engine.messages) in ``lang``, with a ConfigError's
    field first; None when the exception carries no code (its English text is shown)."""
    from engine.messages import message_of

    message = message_of(err)
    if message is None:
        return None
    table = translations()
    texts = {
        key[len(ERROR_PREFIX) :]: text
        for key, text in {**table[DEFAULT_LANG], **table.get(normalize(lang), {})}.items()
        if key.startswith(ERROR_PREFIX)
    }
    text = message.format(texts)
    field_name = getattr(err, "field", None)
    return f"{field_name}: {text}" if field_name else text


def config_texts() -> dict[str, str]:
    """{config key: English text} for every field of the Train form: its label and its help
    (webui.config_form.form_fields, read from engine.config)."""
    from engine.config import form_fields

    out = {}
    for info in form_fields():
        out[config_key(info.key, "label")] = info.label
        if info.help:
            out[config_key(info.key, "info")] = info.help
    return out


def languages() -> list[str]:
    return list(translations())


def language_names() -> list[tuple[str, str]]:
    """(name of the language in itself, code) for the picker: key ``lang.self``."""
    return [(table.get("lang.self", code), code) for code, table in translations().items()]


@lru_cache(maxsize=1)
def i18n():
    """The app's ``gr.I18n`` (passed to ``launch(i18n=...)``)."""
    import gradio as gr

    return gr.I18n(**translations())


def t(key: str):
    """A frontend-translated key for a component's static text."""
    if key not in translations()[DEFAULT_LANG]:
        raise KeyError(f"i18n key {key!r} is not in {LOCALES_DIR / (DEFAULT_LANG + '.yaml')}")
    return i18n()(key)


def normalize(lang: str | None) -> str:
    """'sw-KE' -> 'sw'; unknown -> the default language."""
    if not lang:
        return DEFAULT_LANG
    code = lang.strip().lower().replace("_", "-")
    if code in translations():
        return code
    base = code.split("-")[0]
    return base if base in translations() else DEFAULT_LANG


def _accept_language(header: str) -> str:
    """The best language of an Accept-Language header that we have, else the default."""
    ranked = []
    for i, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if tag:
            ranked.append((-q, i, tag))
    for _, _, tag in sorted(ranked):
        code = tag.lower().split("-")[0]
        if code in translations():
            return code
    return DEFAULT_LANG


def lang_of(request=None, choice: str | None = None) -> str:
    """The visitor's language: the picker's choice (argument, or the cookie it sets), else
    the browser's Accept-Language, else English. ``request`` is a ``gr.Request`` or None."""
    if choice:
        return normalize(choice)
    if request is None:
        return DEFAULT_LANG
    cookies = getattr(request, "cookies", None) or {}
    if cookies.get(COOKIE):
        return normalize(cookies[COOKIE])
    headers = getattr(request, "headers", None) or {}
    header = headers.get("accept-language") or ""
    return _accept_language(header) if header else DEFAULT_LANG


def tr(lang: str | None, key: str, **params) -> str:
    """A message with parameters, formatted on the server in ``lang`` (English when the key
    is missing there). ``{name}`` placeholders are filled from ``params``."""
    table = translations()
    text = table.get(normalize(lang), {}).get(key) or table[DEFAULT_LANG].get(key)
    if text is None:
        raise KeyError(f"i18n key {key!r} is not in {LOCALES_DIR / (DEFAULT_LANG + '.yaml')}")
    return text.format(**params) if params else text


# Gradio 6.31's frontend starts in the browser language only when Gradio itself ships that
# language (Kiswahili is not among them): custom gr.I18n languages are loaded but never
# chosen. So the page sets the language itself, through the changeLocale of Gradio's own
# i18n module (the same module instance the page runs), on load and when the picker
# changes; the choice is kept in localStorage and a cookie the server reads (lang_of).
_SET_LANG_JS = r"""
  var storeKey = "%(store)s", cookie = "%(cookie)s", codes = %(codes)s;
  function pick(tag) {
    tag = (tag || "").toLowerCase();
    if (codes.indexOf(tag) >= 0) return tag;
    tag = tag.split("-")[0];
    return codes.indexOf(tag) >= 0 ? tag : "%(default)s";
  }
  function apply(lang) {
    document.cookie = cookie + "=" + encodeURIComponent(lang) + "; path=/; SameSite=Lax";
    var core = performance.getEntriesByType("resource").map(function (e) { return e.name; })
      .filter(function (n) { return /\/assets\/core-[\w-]+\.js$/.test(n); })[0];
    if (!core) { console.warn("tunelab: Gradio's i18n module not found; language stays"); return; }
    import(core).then(function (m) { m.changeLocale(lang); document.documentElement.lang = lang; });
  }
"""


def _js_consts() -> dict:
    return {
        "store": STORAGE_KEY,
        "cookie": COOKIE,
        "codes": repr(languages()).replace("'", '"'),
        "default": DEFAULT_LANG,
    }


def load_js() -> str:
    """On load: the language in effect (the picker's choice, else the browser's), applied
    and shown in the picker."""
    return (
        "() => {"
        + _SET_LANG_JS % _js_consts()
        + """
  var lang = pick(window.localStorage.getItem(storeKey) || window.navigator.language);
  apply(lang);
  return lang;
}"""
    )


def pick_js() -> str:
    """The picker's change: remember the choice in this browser and switch to it now."""
    return (
        "(lang) => {"
        + _SET_LANG_JS % _js_consts()
        + """
  lang = pick(lang);
  window.localStorage.setItem(storeKey, lang);
  apply(lang);
  return lang;
}"""
    )


def picker():
    """The language picker (a Dropdown) for the header; call inside a Blocks, then
    :func:`connect_picker` once the components it relabels exist."""
    import gradio as gr

    return gr.Dropdown(
        choices=language_names(),
        value=None,
        label=t("lang.picker"),
        scale=0,
        min_width=160,
        interactive=True,
        elem_id="tl-lang",
    )


def connect_picker(demo, dd, relabel: dict) -> None:
    """Apply the language on load and on the picker's change. Gradio translates a label when
    it arrives, and some (the tab names) are not translated again when the language changes,
    so the components of ``relabel`` ({component: key}) get their label sent again."""
    comps = list(relabel)
    kinds = [type(c) for c in comps]

    def labels(lang):
        return [lang] + [kind(label=t(relabel[c])) for kind, c in zip(kinds, comps)]

    common = {"fn": labels, "inputs": dd, "outputs": [dd, *comps], "show_progress": "hidden", "queue": False}
    demo.load(js=load_js(), **common)
    dd.input(js=pick_js(), **common)


# Key prefixes completed at run time with a code (e.g. an engine problem's code): their
# keys count as used (tests/test_i18n.py).
# The Train tab completes a run's state, a plan's key and the comparison's columns.
DYNAMIC: tuple[str, ...] = (
    "problem.code.",
    "problem.unit.",
    CONFIG_PREFIX,
    REASON_PREFIX,
    ERROR_PREFIX,
    "train.state.",
    "train.plan.",
    "train.col.",
    "chat.role.",
)


def problem_where(lang: str | None, problem) -> str:
    """Where an engine.data.Problem is, in ``lang``: 'line 3', 'row 4', 'record 2 (line 10)'
    or 'whole file'."""
    p = problem if isinstance(problem, dict) else problem.to_dict()
    if p.get("record") is None:
        return tr(lang, "problem.whole_file")
    unit = p.get("unit") or "record"
    key = f"problem.unit.{unit}" if f"problem.unit.{unit}" in translations()[DEFAULT_LANG] else "problem.unit.record"
    where = tr(lang, key, n=p["record"])
    if p.get("line") is not None and unit != "line":
        where += " " + tr(lang, "problem.at_line", line=p["line"])
    return where


def problem_message(lang: str | None, problem) -> str:
    """What is wrong, in ``lang``; a code with no key yet shows the engine's English message."""
    p = problem if isinstance(problem, dict) else problem.to_dict()
    key = f"problem.code.{p.get('code') or 'other'}"
    if key not in translations()[DEFAULT_LANG]:
        return p["message"]
    return tr(lang, key, **(p.get("params") or {}))


def problem_text(lang: str | None, problem) -> str:
    """An engine.data.Problem (or its to_dict()) in ``lang``: where, then what."""
    p = problem if isinstance(problem, dict) else problem.to_dict()
    parts = [p["file"]]
    if p.get("record") is not None:
        parts.append(problem_where(lang, p))
    if p.get("field"):
        parts.append(tr(lang, "problem.field", field=p["field"]))
    return ", ".join(parts) + ": " + problem_message(lang, p)
