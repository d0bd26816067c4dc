"""Rebuilds the built-in benchmarks' data (evomerge/tasks/<name>/) from the original benchmark files (run once by maintainers):

    python -m evomerge.data._build ../shared/data

GSM8K and HumanEval keep their fields; MMLU's per-subject CSVs become one JSON-lines file with
a `subject` field. Everything is gzipped; licence files are copied beside the data.
"""

import csv
import gzip
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "tasks"  # each benchmark's data lives beside its task YAML

MMLU_LICENSE = """MIT License

Copyright (c) 2020 Dan Hendrycks

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: byte-identical rebuilds
    with gzip.GzipFile(path, "wb", mtime=0) as raw:
        for row in rows:
            raw.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def build(source: Path) -> None:
    for split in ("train", "test"):
        lines = (source / "gsm8k" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        _write(HERE / "gsm8k" / f"{split}.jsonl.gz", (json.loads(line) for line in lines if line.strip()))
    shutil.copy(source / "gsm8k" / "LICENSE", HERE / "gsm8k" / "LICENSE")

    for split in ("dev", "test"):
        rows = []
        for file in sorted((source / "mmlu" / split).glob("*.csv")):
            subject = file.name.rsplit(f"_{split}.csv", 1)[0]
            with open(file, newline="", encoding="utf-8") as handle:
                for record in csv.DictReader(handle):
                    rows.append({
                        "subject": subject,
                        "question": record["question"],
                        "choices": [record[f"choice{i}"] for i in range(4)],
                        "answer": int(record["answer"]),
                    })
        _write(HERE / "mmlu" / f"{split}.jsonl.gz", rows)
    (HERE / "mmlu" / "LICENSE").write_text(MMLU_LICENSE, encoding="utf-8")

    (HERE / "humaneval").mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "humaneval" / "HumanEval.jsonl.gz", HERE / "humaneval" / "HumanEval.jsonl.gz")
    shutil.copy(source / "humaneval" / "LICENSE", HERE / "humaneval" / "LICENSE")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
