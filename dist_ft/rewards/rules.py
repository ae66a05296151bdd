"""Built-in rule verifiers. Each scores a batch: ``fn(prompts, completions, answers, **kw)``
returns one float per completion."""

from __future__ import annotations

import math
import re


def normalise(text: str) -> str:
    """Case-folded, whitespace-collapsed, without trailing full stops: "  Paris. " == "paris"."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def exact_match(
    prompts: list[str], completions: list[str], answers: list[str | None]
) -> list[float]:
    """1.0 when the normalised completion equals the normalised answer."""
    return [
        float(a is not None and normalise(c) == normalise(a)) for c, a in zip(completions, answers)
    ]


def char_match(
    prompts: list[str], completions: list[str], answers: list[str | None]
) -> list[float]:
    """Characters in the same position as the answer's, over the longer of the two lengths.

    Partial credit gives a dense signal where exact match is almost never hit at first. Dividing
    by the longer length makes extra characters cost as much as missing ones: for "gggg",
    "gggggggg" scores 0.5 and "gg" 0.5, so padding a completion (or repeating the answer until
    ``rollout.max_new_tokens`` runs out) never pays. Both sides are stripped of surrounding
    whitespace first, as ``exact_match`` does, so a leading space or a trailing newline before
    EOS costs nothing.
    """
    out = []
    for c, a in zip(completions, answers):
        c, a = c.strip(), (a or "").strip()
        if not a:
            out.append(0.0)
            continue
        out.append(sum(x == y for x, y in zip(c, a)) / max(len(a), len(c)))
    return out


def format_regex(
    prompts: list[str], completions: list[str], answers: list[str | None], pattern: str
) -> list[float]:
    """1.0 when the whole (stripped) completion matches ``pattern``."""
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(
    prompts: list[str], completions: list[str], answers: list[str | None], max_chars: int
) -> list[float]:
    """0 up to ``max_chars``, then falling linearly to -1 at twice that length."""
    return [-min(1.0, max(0, len(c) - max_chars) / max_chars) for c in completions]


# --- math_answer ---------------------------------------------------------------------------------
# Plain Python on purpose: sympy-based checkers (math_verify) are much slower and need their own
# timeouts for odd LaTeX; this covers the forms GSM8K/MATH-style final answers take.

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_PHRASE = re.compile(r"(?:answer\s+is|answer\s*:|####)\s*:?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# \text{...} and friends; an optional ^2 after a unit ("\text{cm}^2") goes with it.
_TEXT = re.compile(
    r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}(\^\{?\d\}?)?"
)
_FRAC_SHORT = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_VAR_EQ = re.compile(r"^\\?[a-z]+(?:_\{?\w+\}?)?=(.+)$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = r"-?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
_NUM_RE = re.compile(rf"^{_DECIMAL}$")
_RATIO_RE = re.compile(
    rf"^(-?)(?:\\frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}}|({_DECIMAL})/({_DECIMAL}))$"
)


def _braced(text: str, open_at: int) -> str | None:
    """Content of the ``{...}`` group opening at ``open_at``; ``\\{`` does not count. None if
    the group never closes (a truncated completion)."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or the
    token after ``\\boxed 5``; None if there is none."""
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            content = _braced(text, i)
            if content is not None:
                return content
        elif i > m.end():
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a completion commits to, by the first rule that finds one:

    1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``);
    2. the rest of the line after the last "answer is", "answer:" or "####" (any case), up to
       the first full stop that ends a sentence: "The answer is $-3$. Done" -> "$-3$";
    3. the last number in the text ("1,000", "-3.5", "2/3").
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        rest = text[phrases[-1].end() :].split("\n", 1)[0]
        rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0].strip()
        if rest:
            return rest
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _drop_units(s: str) -> str:
    """``\\text{..}`` after a number or expression is a unit and goes ("10\\text{ cm}^2" -> "10");
    anywhere else it is unwrapped ("\\text{Paris}" -> "Paris")."""
    out, pos = [], 0
    for m in _TEXT.finditer(s):
        out.append(s[pos : m.start()])
        prefix = "".join(out).rstrip()
        if not (prefix and (prefix[-1].isdigit() or prefix[-1] in "})")):
            out.append(m.group(1) + (m.group(2) or ""))
        pos = m.end()
    out.append(s[pos:])
    return "".join(out)


def normalise_math(answer: str) -> str:
    """Canonical text of a final answer, so that equal answers written differently compare equal:
    "$x = 1{,}000\\text{ m}.$" -> "1000", "\\dfrac12" -> "\\frac{1}{2}", "+90^\\circ" -> "90"."""
    s = answer.replace("$", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[!,;: ]|~", "", s)  # LaTeX spacing
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _drop_units(s)
    s = _FRAC_SHORT.sub(lambda m: f"\\frac{{{m[1].strip('{}')}}}{{{m[2].strip('{}')}}}", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = "".join(s.split()).lower().replace("{,}", ",")
    if s.count("=") == 1:
        s = _VAR_EQ.sub(r"\1", s)
    s = s.rstrip(".").lstrip("+")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> float | None:
    """Value of a normalised decimal, ``a/b`` or ``\\frac{a}{b}``; None for anything else."""
    if _NUM_RE.match(s):
        return float(s)
    m = _RATIO_RE.match(s)
    if m is None:
        return None
    num, den = (float(m[2]), float(m[3])) if m[2] is not None else (float(m[4]), float(m[5]))
    if den == 0:
        return None
    return (-1.0 if m[1] else 1.0) * num / den


def answers_match(predicted: str, reference: str) -> bool:
    """Equal after ``normalise_math``, or both numbers within 1e-6 relative (1e-9 absolute)."""
    p, r = normalise_math(predicted), normalise_math(reference)
    if not p or not r:
        return False
    if p == r:
        return True
    pv, rv = _as_number(p), _as_number(r)
    return pv is not None and rv is not None and math.isclose(pv, rv, rel_tol=1e-6, abs_tol=1e-9)


def math_answer(
    prompts: list[str], completions: list[str], answers: list[str | None]
) -> list[float]:
    """1.0 when the completion's final answer (see ``extract_answer``) equals the reference answer
    (see ``answers_match``). A reference that is itself boxed is unboxed first; a missing reference
    or a completion without an answer scores 0.0."""
    out = []
    for c, a in zip(completions, answers):
        if a is None:
            out.append(0.0)
            continue
        predicted = extract_answer(c)
        reference = last_boxed(a) or a
        out.append(float(predicted is not None and answers_match(predicted, reference)))
    return out
