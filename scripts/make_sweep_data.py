"""Build the two extra fine-tuning sets shipped in paca_core/data/ (run once; the output is committed).

Why: default learning rates chosen on one data set (Macbeth) did not hold on others, so the lr sweep
(scripts/lr_sweep.py) needs data of other kinds that ship with the project and need no network.
Both come from the Python standard library of the interpreter running this script (PSF licence):

- ``python_stdlib_functions.jsonl``: prompt/response pairs. Prompt = an instruction, the function's
  signature and the first paragraph of its docstring; response = the function body. Only pairs
  whose chat-formatted tokens fit ``--seq-len`` (default 128) in the default model's tokenizer
  are kept, so no response is truncated.
- ``python_reference_topics.jsonl``: ``text`` records, the Python Language Reference topics from
  ``pydoc_data.topics`` (what ``help('if')`` prints), technical prose packed into blocks.

Deterministic: modules, functions and topics are visited in sorted order. The exact files depend on
the Python version (the committed ones: see paca_core/data/README.md).

    python scripts/make_sweep_data.py            # rewrites both files in paca_core/data/
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import textwrap
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "paca_core" / "data"
FUNCTIONS_FILE = "python_stdlib_functions.jsonl"
TOPICS_FILE = "python_reference_topics.jsonl"
#: Top-level stdlib modules read (sorted); packages, tests and generated or data-only modules are skipped.
SKIP_MODULES = {"this", "antigravity", "__future__", "__hello__", "__phello__", "_pydecimal", "_pydatetime", "pydoc_data"}
INSTRUCTION = "Write the body of this function from the Python standard library module `{module}`."


def _first_paragraph(docstring: str) -> str:
    return docstring.strip().split("\n\n")[0].strip()


def _function_pair(source_lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef, module: str) -> dict | None:
    """(prompt, response) for one function with a docstring and a short body, or None."""
    docstring = ast.get_docstring(node)
    if not docstring or len(node.body) < 2:
        return None
    body_start = node.body[1].lineno - 1
    header = source_lines[node.lineno - 1 : node.body[0].lineno - 1]  # the `def ...:` line(s), no decorators
    body = source_lines[body_start : node.end_lineno]
    if not header or not body or any("\t" in line for line in header + body):
        return None
    header_text = textwrap.dedent("".join(header)).rstrip()
    indent = len(body[0]) - len(body[0].lstrip())
    summary = _first_paragraph(docstring)
    doc = textwrap.indent(f'"""{summary}"""', " " * 4)
    body_text = "".join(line[indent - 4 :] if line.strip() else "\n" for line in body).rstrip() + "\n"
    prompt = f"{INSTRUCTION.format(module=module)}\n\n{header_text}\n{doc}"
    return {"prompt": prompt, "response": body_text}


def stdlib_function_pairs(tokenizer, seq_len: int, limit: int) -> list[dict]:
    """Prompt/response pairs from the stdlib's top-level modules that fit ``seq_len`` tokens, ``limit``
    of them spread evenly over all that fit (so no few modules dominate)."""
    from paca_core.data.dataset import prompt_response_ids

    lib = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for path in sorted(lib.glob("*.py")):
        module = path.stem
        if module in SKIP_MODULES or module.startswith("test"):
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        lines = source.splitlines(keepends=True)
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), key=lambda n: n.lineno)
        for node in nodes:
            pair = _function_pair(lines, node, module)
            if pair is None:
                continue
            prompt_ids, response_ids = prompt_response_ids(tokenizer, pair["prompt"], pair["response"])
            if len(prompt_ids) + len(response_ids) <= seq_len and len(response_ids) >= 8:
                pairs.append(pair)
    if len(pairs) <= limit:
        return pairs
    return [pairs[i * len(pairs) // limit] for i in range(limit)]


def reference_topics(max_bytes: int) -> list[dict]:
    """Language Reference topics in sorted order until ``max_bytes`` of text."""
    from pydoc_data.topics import topics

    records, size = [], 0
    for name in sorted(topics):
        text = topics[name].strip() + "\n"
        if size + len(text.encode()) > max_bytes:
            continue
        records.append({"text": text})
        size += len(text.encode())
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{path}: {len(records)} records, {path.stat().st_size:,} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=128, help="keep only function pairs that fit this many tokens")
    parser.add_argument("--max-functions", type=int, default=800)
    parser.add_argument("--max-topic-bytes", type=int, default=160_000)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoTokenizer

    from paca_core.files import assets

    tokenizer = AutoTokenizer.from_pretrained(str(assets.default_model_path()))
    print(f"Python {sys.version.split()[0]}, stdlib {sysconfig.get_paths()['stdlib']}")
    _write_jsonl(args.out / FUNCTIONS_FILE, stdlib_function_pairs(tokenizer, args.seq_len, args.max_functions))
    _write_jsonl(args.out / TOPICS_FILE, reference_topics(args.max_topic_bytes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
