"""Answer checking for evaluation: the last ``\\boxed{...}`` of a response against the reference.

``answers_match`` first compares normalised strings and exact rationals (enough for the arithmetic
task: ``62``, ``62.0``, ``$62$``, ``\\frac{1}{2}`` vs ``0.5``); when the optional ``math-verify``
package is installed it is asked as well, for symbolic answers (``\\sqrt{2}/2`` vs ``\\frac{1}{\\sqrt 2}``).
"""

from __future__ import annotations

import re
from fractions import Fraction

try:
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify
except ImportError:  # optional dependency
    _mv_parse = _mv_verify = None

_BOXED = re.compile(r"\\(?:boxed|fbox)")
_TEXT_LIKE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_DECIMAL = re.compile(r"^-?(\d+\.?\d*|\.\d+)$")
_RATIO = re.compile(r"^(-?\d+)/(-?\d+)$")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``.

    Nested braces are matched; escaped braces (``\\{``) do not count. An unclosed last box gives None.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    if i < len(text) and text[i] == " ":
        rest = text[i:].strip()
        return rest.split()[0].rstrip("$.") if rest else None
    if i >= len(text) or text[i] != "{":
        return None
    depth, start = 0, i + 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str, fallback: str = "none") -> str | None:
    """The answer a response gives: its last ``\\boxed{}``; with ``fallback="last_number"`` and no
    box, the last number in the text (for models that answer correctly but never box)."""
    boxed = extract_boxed(text)
    if boxed is not None or fallback == "none":
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: no ``$``, ``\\text{}`` wrappers, spacing commands, whitespace or
    trailing period; ``\\dfrac``/``\\tfrac`` become ``\\frac``; thousands separators are dropped."""
    s = answer.strip()
    prev = None
    while prev != s:  # unwrap nested \text{\textbf{...}}
        prev, s = s, _TEXT_LIKE.sub(r"\1", s)
    for token in ("$", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle"):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _as_rational(s: str) -> Fraction | None:
    if _DECIMAL.match(s):
        return Fraction(s)
    match = _RATIO.match(s)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2)))
    match = _FRAC.match(s)
    if match and int(match.group(3)) != 0:
        value = Fraction(int(match.group(2)), int(match.group(3)))
        return -value if match.group(1) else value
    return None


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Whether predicted answer ``pred`` equals reference ``ref`` (both without ``\\boxed``)."""
    if pred is None or ref is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(ref)
    if not a or not b:
        return False
    if a == b:
        return True
    ra, rb = _as_rational(a), _as_rational(b)
    if ra is not None and rb is not None:
        return ra == rb
    if _mv_verify is None:
        return False
    try:
        return bool(_mv_verify(_mv_parse(f"${ref}$"), _mv_parse(f"${pred}$")))
    except Exception:  # math-verify is a best-effort oracle: an unparsable answer is a mismatch
        return False
