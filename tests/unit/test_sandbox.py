"""HumanEval execution (safeanchor.sandbox): a separate process with a time limit, no network,
no process creation, no writes outside its temporary directory, and completions assembled the
way chat models write them (fenced whole function, or a bare body)."""

import json
from pathlib import Path

import pytest

from safeanchor.sandbox import extract_code, humaneval_program, pass_at_1, run_python

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hub" / "humaneval.jsonl"
PROBLEMS = [json.loads(line) for line in FIX.read_text().splitlines()]


def _problem(p):
    return {"code_prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = [_problem(p) for p in PROBLEMS]
    fenced = [f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in PROBLEMS]
    body = [p["canonical_solution"] for p in PROBLEMS]
    wrong = ["    return 0\n", "    return xs\n", "```python\ndef shout(word):\n    return word\n```"]
    res = pass_at_1(problems * 3, fenced + body + wrong, timeout_s=10, workers=3)
    assert [r.passed for r in res] == [True] * 6 + [False] * 3, [r.status for r in res]
    assert {r.status for r in res[6:]} == {"failed: AssertionError"}


def test_limits_and_guards(tmp_path):
    outside = tmp_path / "escaped.txt"
    cases = {
        "while True: pass": "timeout",
        "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)": "failed: PermissionError",
        "import subprocess; subprocess.run(['true'])": "failed: PermissionError",
        "import os; os.system('true')": "failed: PermissionError",
        f"open({str(outside)!r}, 'w').write('x')": "failed: PermissionError",
        "open('inside.txt', 'w').write('x'); assert open('inside.txt').read() == 'x'": "passed",
        # empty environment (Python itself adds LC_CTYPE when the locale is C: PEP 538)
        "import os; assert set(os.environ) <= {'LC_CTYPE'}, dict(os.environ)": "passed",
        "x = bytearray(1 << 31)": "failed: MemoryError",
    }
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda code: run_python(code, timeout_s=3, memory_mb=512), cases))
    assert [r.status for r in got] == list(cases.values())
    assert not outside.exists()


def test_code_extraction_and_assembly():
    assert extract_code("x\n```python\ndef f():\n    return 1\n```\ntail") == "def f():\n    return 1\n"
    assert extract_code("```\nprint(2)") == "print(2)"  # cut off by the token limit: to the end
    assert extract_code("return 3") == "return 3"
    prog = humaneval_program("def f(a):\n    \"\"\"doc\"\"\"\n", "return a", "def check(c):\n    assert c(1) == 1\n", "f")
    assert "    return a" in prog and prog.rstrip().endswith("check(f)")
    assert run_python(prog).passed
    with pytest.raises(ValueError, match="2 problems but 1"):
        pass_at_1([_problem(PROBLEMS[0])] * 2, ["x"])
