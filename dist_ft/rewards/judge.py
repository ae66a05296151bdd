"""RLAIF judge: a frozen causal LM scores completions against a written constitution.

Two modes, read from the judge's next-token distribution rather than from sampled text, so a
reward is continuous and deterministic:

- ``pointwise``: the judge reads one (prompt, completion) and the reward is its expected rating,
  ``sum_k p_k * value_k`` with ``p`` the softmax over the rating tokens only.
- ``group``: the judge reads all G completions of a prompt, each behind a one-token label, and
  the reward of completion i is the probability that label i is named best. A group's G scores
  sum to 1, so they rank the group (what GRPO's group-relative advantage uses anyway).

``compare`` (RLAIF labelling, ``dist-ft label``) judges pairs instead: each pair is shown as a
group of two in both orders and the two verdicts are averaged, since a group judge favours some
slots whatever they hold.

``JudgeWorker`` is a plain class; ``cluster/ray.py`` wraps it as a Ray actor. Shapes: Q = judge
queries (N completions in pointwise mode, Bg groups in group mode), L = tokens, V = vocabulary,
K = choice tokens (ratings or labels); in ``compare``, P = pairs, R = readings of the
constitution (whole, then each principle alone), U = distinct queries.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import inspect
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import AutoModelForCausalLM

from dist_ft.model.loading import DTYPES, load_tokenizer
from dist_ft.model.spec import Device, HFModel

# Char-level tiny model: 1 token per character and 512 positions, so the fixed text is ~100
# tokens and leaves the rest to the constitution, prompt and completion(s). Each template ends
# right where the judge's answer starts: the next token is the rating (or the label).
POINTWISE_TEMPLATE = (
    "Rate the reply by these principles:\n{principles}\n"
    "Prompt: {prompt}\nReply: {completion}\nRating ({scale}): "
)
GROUP_TEMPLATE = (
    "Which reply best follows these principles?\n{principles}\n"
    "Prompt: {prompt}\n{completions}\nBest reply ({labels}): "
)
DEFAULT_RATINGS = ["1", "2", "3", "4", "5"]
# Digits, not letters: BPE tokenizers (Qwen, Llama-3) split digits from a preceding space, so
# "...: " + "3" is how they tokenize it too; "...: " + "A" would merge into " A" instead.
DEFAULT_LABELS = [str(i) for i in range(1, 10)]


class JudgeError(ValueError):
    """A judge or constitution is misconfigured; the message names the file or value."""


class JudgeMode(str, enum.Enum):
    POINTWISE = "pointwise"
    GROUP = "group"


# ---------------------------------------------------------------------------- constitution
@dataclass(frozen=True)
class Constitution:
    name: str
    principles: list[str]

    def render(self) -> str:
        """Numbered principles, one a line: "1. ...\\n2. ..."."""
        return "\n".join(f"{i}. {p}" for i, p in enumerate(self.principles, 1))

    def sha256(self) -> str:
        """Hex SHA-256 of :meth:`render`, the principles as the judge reads them: it names what a
        label was judged against, and a file's comments, layout or format do not change it."""
        return hashlib.sha256(self.render().encode()).hexdigest()


_CONSTITUTION_KEYS = ("name", "principles")
_MD_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(\S.*)$")
_MD_TITLE = re.compile(r"^#\s+(.+?)\s*#*\s*$")


def load_constitution(path: str | Path) -> Constitution:
    """A constitution from ``.yaml``/``.yml`` (``principles: [...]``, optional ``name``) or
    ``.md`` (every list item ``- ...`` / ``1. ...`` is a principle; the first ``# title`` is the
    name). The name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"constitution file '{path}' does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        name, principles = _parse_yaml(path, text)
    elif suffix == ".md":
        name, principles = _parse_markdown(text)
        if not principles:
            raise JudgeError(
                f"constitution '{path}' has no principles: write them as a markdown list "
                "('- be honest' or '1. be honest')"
            )
    else:
        raise JudgeError(f"constitution '{path}': unsupported file type (use .yaml, .yml or .md)")
    return Constitution(name=name or path.stem, principles=principles)


def _parse_yaml(path: Path, text: str) -> tuple[str | None, list[str]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JudgeError(f"constitution '{path}' is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JudgeError(
            f"constitution '{path}' must be a mapping with 'principles: [...]' and an optional "
            f"'name', not a {type(data).__name__}"
        )
    for key in data:
        if key not in _CONSTITUTION_KEYS:
            close = difflib.get_close_matches(str(key), _CONSTITUTION_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise JudgeError(
                f"constitution '{path}': unknown key '{key}' (valid: name, principles){hint}"
            )
    principles = data.get("principles")
    if not principles:
        raise JudgeError(
            f"constitution '{path}' has no principles: add a non-empty 'principles: [...]' list"
        )
    if not isinstance(principles, list) or not all(
        isinstance(p, str) and p.strip() for p in principles
    ):
        raise JudgeError(f"constitution '{path}': 'principles' must be a list of non-empty strings")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise JudgeError(f"constitution '{path}': 'name' must be a string")
    return name, [" ".join(p.split()) for p in principles]


def _parse_markdown(text: str) -> tuple[str | None, list[str]]:
    name, items, in_item = None, [], False
    for line in text.splitlines():
        if m := _MD_ITEM.match(line):
            items.append(m.group(1).strip())
            in_item = True
        elif in_item and line[:1].isspace() and line.strip():
            items[-1] += " " + line.strip()  # an item wrapped onto an indented next line
        else:
            in_item = False
            if name is None and (m := _MD_TITLE.match(line)):
                name = m.group(1)
    return name, items


# ---------------------------------------------------------------------------- judge
@dataclass(frozen=True)
class JudgeSpec:
    """Everything a judge is built from (``run.specs.judge_spec`` fills it from
    ``reward.judge.*``).

    ``ratings`` are the pointwise choices (valued ``float(r)``, or 1..K when any is not a
    number); ``labels`` name the completions in group mode (G <= len(labels)) and, the first
    two, the pair in :meth:`JudgeWorker.compare` (any mode). Every choice must be one token.
    ``template`` defaults to ``POINTWISE_TEMPLATE`` / ``GROUP_TEMPLATE``. ``max_length`` caps a
    judge query in tokens (default: the model's position limit)."""

    model_path: str
    constitution: str  # a YAML or Markdown file, or a built-in constitution's name
    mode: Literal["pointwise", "group"] = "pointwise"
    ratings: tuple[str, ...] = tuple(DEFAULT_RATINGS)
    labels: tuple[str, ...] = tuple(DEFAULT_LABELS)
    template: str | None = None
    device: Device = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 16
    max_length: int | None = None
    trust_remote_code: bool = False


class JudgeWorker:
    """Scores completions with a frozen judge model. A plain class (no Ray import)."""

    model: HFModel  # declared here: an annotated self.model = ... would narrow it to the stub's

    def __init__(self, spec: JudgeSpec) -> None:
        mode, dtype, batch_size = spec.mode, spec.dtype, spec.batch_size
        model_path, trust_remote_code = spec.model_path, spec.trust_remote_code
        ratings, labels = spec.ratings, spec.labels
        try:
            self.mode = JudgeMode(mode)
        except ValueError:
            raise JudgeError(f"judge mode '{mode}' is not one of 'pointwise', 'group'") from None
        if dtype not in DTYPES:
            raise JudgeError(f"judge dtype '{dtype}' is not one of {sorted(DTYPES)}")
        if batch_size < 1:
            raise JudgeError(f"judge batch_size must be >= 1, got {batch_size}")
        self.constitution = load_constitution(spec.constitution)
        self._principles = self.constitution.render()
        pointwise = self.mode is JudgeMode.POINTWISE
        self.choices = list(ratings if pointwise else labels)
        if not self.choices or len(set(self.choices)) != len(self.choices):
            what = "ratings" if pointwise else "labels"
            raise JudgeError(f"judge {what} must be distinct and non-empty, got {self.choices}")
        self.template = spec.template or (POINTWISE_TEMPLATE if pointwise else GROUP_TEMPLATE)
        _check_template(self.template, self.mode)
        # compare() shows a pair as a group of two: a group judge's own template and labels,
        # else the built-in group template. Checked on first use, so a pointwise judge that is
        # never asked to compare never fails on labels it does not use.
        self._pair_template = GROUP_TEMPLATE if pointwise else self.template
        self._pair_labels = list(labels[:2])
        self._pair_ids: list[int] | None = None
        self.model_path = model_path
        self.batch_size = batch_size
        self.device = torch.device(spec.device)

        # Tokenizer checks come before the model load, so a bad rating fails in a second.
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.truncation_side = "left"  # a last-resort cut must keep "Rating: " at the end
        probe = self._fill("x", ["y"] * (1 if pointwise else len(self.choices)))
        self._choice_ids = [self._choice_token(c, probe) for c in self.choices]
        self._values_K = torch.tensor(_rating_values(self.choices), dtype=torch.float32)

        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval().requires_grad_(False)
        limits = [
            m
            for m in (
                spec.max_length,
                getattr(self.model.config, "max_position_embeddings", None),
                self.tokenizer.model_max_length,
            )
            if isinstance(m, int) and 0 < m < 1_000_000  # tokenizers say 1e30 for "no limit"
        ]
        self.max_length = min(limits) if limits else 4096
        # Only the last position's logits are read: [Q, L, V] would be 16 x 2048 x 152k floats
        # (20 GB) for a Qwen judge, [Q, 1, V] is 10 MB.
        self._keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._overhead: dict[tuple[int, bool, str | None], int] = {}
        if pointwise:
            self._budget(1)  # fail now if the template and constitution alone do not fit

        keys = ("requests", "cache_hits", "forward_passes", "tokens", "truncated")
        self._total = dict.fromkeys(keys, 0)
        self._last = dict.fromkeys(keys, 0)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(
        self, prompts: list[str], completions: list[str], group_ids: Sequence[int] | None = None
    ) -> list[float]:
        """One score per completion, in order.

        pointwise: the expected rating in [min rating, max rating]; ``group_ids`` are unused.
        group: P(completion i is named best among its group); each group's scores sum to 1. A
        group is the completions sharing a group id (in any rows: ids, not row order, say which
        completions compete), shown in row order; every group has the same size G, since one
        call reads one label set.
        """
        n = len(completions)
        if len(prompts) != n:
            raise JudgeError(f"judge got {len(prompts)} prompts for {n} completions")
        self._last = dict.fromkeys(self._last, 0)
        members: dict[int, list[int]] = {}  # group id -> its rows, in row order
        if self.mode is JudgeMode.POINTWISE:
            keys: list[tuple[str, tuple[str, ...]]] = [
                (p, (c,)) for p, c in zip(prompts, completions)
            ]
            choice_ids = self._choice_ids
        else:
            if group_ids is None or len(group_ids) != n:
                got = "none" if group_ids is None else len(group_ids)
                raise JudgeError(f"group judge needs one group id per completion ({n}), got {got}")
            for i, gid in enumerate(group_ids):
                members.setdefault(int(gid), []).append(i)
            sizes = sorted({len(rows) for rows in members.values()})
            if len(sizes) > 1:
                raise JudgeError(f"group judge: groups of sizes {sizes}; all must have one size")
            g = sizes[0] if sizes else 0
            if g > len(self.choices):
                raise JudgeError(
                    f"group judge has {len(self.choices)} labels {self.choices} but groups of "
                    f"{g}: pass more one-token labels"
                )
            keys = []
            for gid, rows in members.items():
                if len({prompts[i] for i in rows}) != 1:
                    raise JudgeError(
                        f"group judge: the prompts of group {gid} (rows {rows}) differ; a group's "
                        "completions answer one prompt"
                    )
                keys.append((prompts[rows[0]], tuple(completions[i] for i in rows)))
            choice_ids = self._choice_ids[:g]  # a label not shown must get no probability

        # Cached within one call (one step) only: GRPO's G samples of a prompt often repeat
        # (short answers), but the policy moves every step, so older entries rarely hit again.
        unique = list(dict.fromkeys(keys))
        row = {key: i for i, key in enumerate(unique)}
        self._add("requests", len(keys))
        self._add("cache_hits", len(keys) - len(unique))
        if not unique:
            return []
        rendered = [self._render(p, list(cs)) for p, cs in unique]
        self._add("truncated", sum(cut for _, cut in rendered))
        probs_UK = self._choice_probs([text for text, _ in rendered], choice_ids)
        probs_QK = probs_UK[[row[key] for key in keys]]
        if self.mode is JudgeMode.POINTWISE:
            scores_N = probs_QK @ self._values_K  # expected rating: continuous in the logits
        else:  # [Bg, G] back to each completion's row
            scores_N = torch.empty(n)
            scores_N[[i for rows in members.values() for i in rows]] = probs_QK.reshape(-1)
        return scores_N.tolist()

    def score_with_stats(
        self, prompts: list[str], completions: list[str], group_ids: Sequence[int] | None = None
    ) -> tuple[list[float], dict[str, int]]:
        """:meth:`score` and the counts of that call, in one (remote) call: a judge actor
        shared by several rollout workers serves one call at a time."""
        return self.score(prompts, completions, group_ids), self.stats(last_call=True)

    @torch.inference_mode()
    def compare(
        self, prompts: list[str], firsts: list[str], seconds: list[str]
    ) -> tuple[list[float], list[list[float]]]:
        """How much the judge prefers ``firsts[i]`` to ``seconds[i]`` as the answer to
        ``prompts[i]``: a margin in [-1, 1] per pair, and per pair one per principle.

        Position-debiased: the judge reads each pair as a group of two in both orders ("[1] a
        [2] b", then "[1] b [2] a") and the margin is ``P(1 | a, b) - P(1 | b, a)``, a's lead
        over b averaged over the two orders. A judge that favours a slot whatever it holds
        gives 0, and swapping a and b negates the margin exactly. Per principle: the same with
        the constitution cut to that principle alone; rows [P][C] in constitution order (a
        one-principle constitution repeats the overall margin rather than judge it twice).
        """
        n = len(prompts)
        if len(firsts) != n or len(seconds) != n:
            raise JudgeError(
                f"judge compare got {n} prompts, {len(firsts)} firsts, {len(seconds)} seconds"
            )
        self._last = dict.fromkeys(self._last, 0)
        choice_ids = self._pair_choice_ids()
        principles = self.constitution.principles
        readings: list[str | None] = [None]  # None: the whole constitution
        if len(principles) > 1:
            readings += [Constitution(self.constitution.name, [p]).render() for p in principles]
        # [R, P, 2 orders] keys, reading-major; identical queries are judged once
        keys = [
            (reading, prompt, shown)
            for reading in readings
            for prompt, a, b in zip(prompts, firsts, seconds)
            for shown in ((a, b), (b, a))
        ]
        unique = list(dict.fromkeys(keys))
        row = {key: i for i, key in enumerate(unique)}
        self._add("requests", len(keys))
        self._add("cache_hits", len(keys) - len(unique))
        if not unique:
            return [], []
        rendered = [self._render(p, list(shown), True, r) for r, p, shown in unique]
        self._add("truncated", sum(cut for _, cut in rendered))
        first_U = self._choice_probs([text for text, _ in rendered], choice_ids)[:, 0]
        first_RP2 = first_U[[row[key] for key in keys]].view(len(readings), n, 2)  # P(label 1)
        margin_RP = first_RP2[..., 0] - first_RP2[..., 1]
        margins = margin_RP[0].tolist()
        per_principle = margin_RP[1:].T.tolist() if len(readings) > 1 else [[m] for m in margins]
        return margins, per_principle

    def render(self, prompt: str, completions: list[str]) -> str:
        """The judge's input for one query (one completion in pointwise mode, the group in group
        mode). When the query would pass ``max_length`` tokens, the prompt keeps its end (the
        question) and each completion its start, sharing the room fairly."""
        return self._render(prompt, completions)[0]

    def stats(self, last_call: bool = False) -> dict[str, int]:
        """Counts since construction, or of the latest ``score`` call (to log per step):
        ``requests`` (judge queries asked), ``cache_hits`` (answered by an identical query in the
        same call), ``forward_passes`` (model calls), ``tokens`` (non-pad tokens read) and
        ``truncated`` (queries cut to fit ``max_length``)."""
        return dict(self._last if last_call else self._total)

    # ------------------------------------------------------------------ internals
    def _choice_probs(self, texts: list[str], choice_ids: list[int]) -> torch.Tensor:
        """Softmax over the choice tokens at the position after each text. [Q, K] float32."""
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out_QK = torch.empty(len(texts), len(choice_ids))
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            ids_QL = enc["input_ids"].to(self.device)
            mask_QL = enc["attention_mask"].to(self.device)
            # Positions count from the first real token under left padding (as generate does),
            # so a query's score does not depend on its batch: RoPE would not care about the
            # shift, but learned absolute positions (GPT-2, OPT) would.
            pos_QL = (mask_QL.cumsum(-1) - 1).clamp(min=0)
            kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_last else {}
            logits = self.model(
                input_ids=ids_QL, attention_mask=mask_QL, position_ids=pos_QL, **kwargs
            ).logits
            logits_QK = logits[:, -1, choice_ids].float()
            # Renormalised over the K choices: mass on other tokens is the judge straying from
            # the format, not an opinion, so it is dropped rather than counted as a low score.
            out_QK[idx] = torch.softmax(logits_QK, dim=-1).cpu()
            self._add("forward_passes", 1)
            self._add("tokens", int(mask_QL.sum()))
        return out_QK

    def _pair_choice_ids(self) -> list[int]:
        """The token ids of the two labels :meth:`compare` reads, checked on first use."""
        if self._pair_ids is None:
            if len(set(self._pair_labels)) != 2:
                raise JudgeError(
                    f"judge compare needs two distinct labels, got {self._pair_labels}"
                )
            probe = self._fill("x", ["y", "y"], pair=True)
            self._pair_ids = [self._choice_token(c, probe) for c in self._pair_labels]
            self._budget(2, pair=True)  # the template and constitution alone must fit
        return self._pair_ids

    def _render(
        self,
        prompt: str,
        completions: list[str],
        pair: bool = False,
        principles: str | None = None,
    ) -> tuple[str, bool]:
        """The judge's input and whether anything was cut to fit. ``pair``: a :meth:`compare`
        query; ``principles``: the rendered principles to show (default: all)."""
        budget = self._budget(len(completions), pair, principles)
        ids = [self._encode(t) for t in (prompt, *completions)]
        caps = _fair_caps([len(x) for x in ids], budget)
        if all(cap == len(x) for cap, x in zip(caps, ids)):
            return self._fill(prompt, completions, pair, principles), False
        decode = self.tokenizer.decode
        prompt = decode(ids[0][len(ids[0]) - caps[0] :]) if caps[0] else ""
        completions = [decode(x[:cap]) for x, cap in zip(ids[1:], caps[1:])]
        return self._fill(prompt, completions, pair, principles), True

    def _fill(
        self,
        prompt: str,
        completions: list[str],
        pair: bool = False,
        principles: str | None = None,
    ) -> str:
        principles = self._principles if principles is None else principles
        if self.mode is JudgeMode.POINTWISE and not pair:
            return self.template.format(
                principles=principles,
                prompt=prompt,
                completion=completions[0],
                scale=f"{self.choices[0]}-{self.choices[-1]}",
            )
        template = self._pair_template if pair else self.template
        labels = (self._pair_labels if pair else self.choices)[: len(completions)]
        block = "\n".join(f"[{label}] {c}" for label, c in zip(labels, completions))
        return template.format(
            principles=principles,
            prompt=prompt,
            completions=block,
            labels=f"{labels[0]}-{labels[-1]}",
        )

    def _budget(self, n_completions: int, pair: bool = False, principles: str | None = None) -> int:
        """Tokens left for the prompt and completions once the fixed text is in."""
        key = (n_completions, pair, principles)
        if key not in self._overhead:
            fixed = self._fill("", [""] * n_completions, pair, principles)
            self._overhead[key] = len(self.tokenizer(fixed)["input_ids"])
        budget = self.max_length - self._overhead[key]
        if budget < 1 + n_completions:
            raise JudgeError(
                f"judge template and constitution '{self.constitution.name}' take "
                f"{self._overhead[key]} tokens with {n_completions} completion(s), "
                f"leaving no room within max_length={self.max_length}: shorten them"
            )
        return budget

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _choice_token(self, choice: str, probe: str) -> int:
        ids = self._encode(choice)
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise JudgeError(
                f"judge choice '{choice}' is {len(ids)} tokens {pieces} for the tokenizer of "
                f"{self.model_path}; every rating/label must be exactly one token, since the "
                "judge reads a single next-token distribution"
            )
        # The score is this token's logit right after the template. If the tokenizer would
        # merge it with the template's tail (": " + "A" -> ":" " A"), the judge never emits it
        # there and its probability is meaningless.
        if self._encode(probe + choice) != self._encode(probe) + ids:
            raise JudgeError(
                f"judge choice '{choice}' does not follow the template's last characters "
                f"{probe[-12:]!r} as its own token for the tokenizer of {self.model_path}: end "
                "the template without the trailing space and use choices like ' 3'"
            )
        return ids[0]

    def _add(self, key: str, value: int) -> None:
        self._last[key] += value
        self._total[key] += value


def _check_template(template: str, mode: JudgeMode) -> None:
    if mode is JudgeMode.POINTWISE:
        required, optional = {"principles", "prompt", "completion"}, {"scale"}
    else:
        required, optional = {"principles", "prompt", "completions"}, {"labels"}
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise JudgeError(f"judge template is not a valid str.format string: {e}") from None
    unknown, missing = fields - required - optional, required - fields
    if unknown or missing:
        raise JudgeError(
            f"{mode.value} judge template: unknown placeholders {sorted(unknown)}, missing "
            f"{sorted(missing)}; it takes {sorted(required)} and optionally {sorted(optional)}"
        )


def _rating_values(ratings: list[str]) -> list[float]:
    """``float(r)`` for each rating when all are numbers, else 1..K in the given order."""
    try:
        return [float(r) for r in ratings]
    except ValueError:
        return [float(i) for i in range(1, len(ratings) + 1)]


def _fair_caps(lengths: list[int], budget: int) -> list[int]:
    """Token caps summing to at most ``budget``: equal shares, with what a short text leaves
    unused handed on to the longer ones (water-filling)."""
    caps = [0] * len(lengths)
    left = budget
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for k, i in enumerate(order):
        caps[i] = min(lengths[i], left // (len(lengths) - k))
        left -= caps[i]
    return caps
