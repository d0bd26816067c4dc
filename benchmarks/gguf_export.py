"""GGUF export of a study's winner: every type written, timed, and checked against the checkpoint.

In one run:
  1. the winner exported as a Hugging Face checkpoint (`evomerge export`, no GGUF);
  2. each GGUF type written from it (K-quants through llama-quantize when on PATH): seconds, size,
     and write throughput against this machine's memory bandwidth (a numpy copy of the same bytes);
  3. each file loaded back by transformers (`gguf_file=`): top-1 agreement of next-token predictions
     with the checkpoint, and the relative logit error, on held-out GSM8K / MMLU / HumanEval prompts;
  4. with llama-cpp-python installed: llama.cpp's greedy generation from each file (64 prompt
     tokens, up to --generate new ones or the end of turn) against transformers' from the
     checkpoint: tokens equal up to the first difference, summed over the prompts.

Usage: python benchmarks/gguf_export.py [RESULTS_DIR] [--types f16 q8_0 ...]   (prints Markdown)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.engine.gguf import K_QUANTS, QUANTIZE_TOOL, TYPES, quantize, write_gguf  # noqa: E402
from evomerge.evaluation import task_items  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402
from evomerge.search.export import export  # noqa: E402


def prompts(count: int) -> list[str]:
    gsm8k = [f"Question: {i['question']}\nAnswer: {i['answer']}" for i in task_items("gsm8k", "heldout", count, 0)[0]]
    mmlu = [f"{i['question']}\n" + "\n".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(i['choices']))
            + f"\nAnswer: {'ABCD'[i['answer']]}" for i in task_items("mmlu", "heldout", count, 0)[0]]
    code = [i["prompt"] + i["canonical_solution"] for i in task_items("humaneval", "heldout", count, 0)[0]]
    return gsm8k + mmlu + code


def bandwidth(nbytes: int) -> float:
    """GB/s of a plain numpy copy of `nbytes` (the memory-bandwidth yardstick)."""
    source = np.ones(nbytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    start = time.perf_counter()
    for _ in range(3):
        np.copyto(target, source)
    return 3 * 2 * source.nbytes / (time.perf_counter() - start) / 1e9  # read + write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results_dir", nargs="?", default="results/demo")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0",
                                                       "q6_k", "q5_k_m", "q4_k_m"])
    parser.add_argument("--prompts", type=int, default=4, help="held-out items per task")
    parser.add_argument("--generate", type=int, default=24, help="tokens llama.cpp generates per prompt")
    args = parser.parse_args()
    types = [t for t in args.types if t in TYPES and (t not in K_QUANTS or shutil.which(QUANTIZE_TOOL))]
    skipped = [t for t in args.types if t not in types]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    try:
        start = time.perf_counter()
        folder = export(args.results_dir, work / "winner", progress=False)
        export_seconds = time.perf_counter() - start
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        texts = prompts(args.prompts)
        batches = [tokenizer(t, return_tensors="pt").input_ids[:, :384] for t in texts]
        with torch.no_grad():
            expected = [reference(ids).logits[0] for ids in batches]
        try:
            import llama_cpp
        except ImportError:
            llama_cpp = None
        greedy = {}
        eos = tokenizer.eos_token_id
        if llama_cpp is not None:
            for text, ids in zip(texts, batches):
                head = ids[:, :64]
                out = reference.generate(head, max_new_tokens=args.generate, do_sample=False)[0, head.shape[1]:].tolist()
                greedy[text] = out[:out.index(eos) + 1] if eos in out else out  # up to the end of turn
        rows = []
        f16 = None
        for kind in types:
            target = folder / f"winner-{kind.upper()}.gguf"
            start = time.perf_counter()
            if kind in K_QUANTS:
                if f16 is None:
                    f16 = write_gguf(folder, work / "f16.gguf", "f16", progress=False)
                quantize(f16, target, kind)
            else:
                write_gguf(folder, target, kind, progress=False)
            seconds = time.perf_counter() - start
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=target.name, dtype=torch.float32).eval()
            same = total = 0
            errors = []
            with torch.no_grad():
                for ids, logits in zip(batches, expected):
                    got = model(ids).logits[0]
                    same += int((got.argmax(-1) == logits.argmax(-1)).sum())
                    total += len(logits)
                    errors.append(((got - logits).norm() / logits.norm()).item())
            agreement = "—"
            if llama_cpp is not None:
                llm = llama_cpp.Llama(model_path=str(target), n_ctx=512, n_threads=2, verbose=False)
                matched = generated = 0
                for text, ids in zip(texts, batches):
                    out = []
                    for token in llm.generate(ids[0, :64].tolist(), top_k=1, temp=0.0, reset=True):
                        out.append(token)
                        if len(out) == args.generate or token == eos:
                            break
                    want = greedy[text]
                    prefix = next((i for i, (a, b) in enumerate(zip(out, want)) if a != b), min(len(out), len(want)))
                    matched += prefix
                    generated += len(want)
                llm.close()
                agreement = f"{matched}/{generated}"
            size = target.stat().st_size
            rows.append([kind, f"{size / 1e6:,.1f}", f"{size / weights:.3f}", f"{seconds:.1f}",
                         f"{weights / seconds / 1e6:,.0f}", f"{same / total:.3f}", f"{np.mean(errors):.4f}", agreement])
            del model
        print(f"Winner of `{args.results_dir}` exported in {export_seconds:.1f} s ({weights / 1e6:,.1f} MB of "
              f"safetensors); memory bandwidth (numpy copy): {bandwidth(weights):.1f} GB/s; "
              f"{sum(len(e) for e in expected)} next-token predictions over {len(texts)} held-out prompts.\n")
        print(markdown_table(["type", "MB", "size / checkpoint", "write s", "MB/s read", "top-1 agreement",
                              "relative logit error", "llama.cpp greedy tokens = transformers"], rows))
        if skipped:
            print(f"\nNot written: {', '.join(skipped)} ({QUANTIZE_TOOL} not on PATH)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
