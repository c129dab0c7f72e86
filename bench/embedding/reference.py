#!/usr/bin/env python3
"""The Python reference for Stowage's built-in embedding model.

Runs all-MiniLM-L6-v2 with sentence-transformers (the reference
implementation) from the same local folder the worker loads
(STOWAGE_EMBEDDING_MODEL_DIR), with no network. Installed by
`scripts/stack install embedref`; run with its python
(STOWAGE_EMBEDREF_PYTHON).

  reference.py fixture OUT.json   vectors of fixed sample sentences, for the
                                  agreement test (committed; rerun only when
                                  the samples change)
  reference.py bench TEXTS.json   embeds the texts (a JSON list) in batches of
                                  32 and prints one JSON line: texts, seconds,
                                  cpu_seconds (all threads), vectors (for the
                                  agreement figure)
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from sentence_transformers import SentenceTransformer  # noqa: E402

# Short, long (past the shipped tokenizer's 128-token cut, under 256), very
# long (past 256: truncated), non-ASCII, punctuation-only, code.
LONG = " ".join(
    f"Sentence {i} of a runbook about restoring PostgreSQL from a base backup and WAL archive."
    for i in range(12)
)
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I resume a multipart upload after the pod was killed?",
    "Stowage verifies every part with a checksum before completing the object.",
    "NATS JetStream keeps the task queue; PostgreSQL advisory locks keep one writer per key.",
    "A recipe for sourdough bread needs flour, water, salt and patience.",
    "Kubernetes operators reconcile custom resources toward their desired state.",
    "Café crème, naïve façade, Ünïcödé and 日本語のテキスト are tokenized too.",
    "?!...",
    "fn main() { println!(\"hello\"); }",
    LONG,
    LONG + " " + LONG + " " + LONG,
    "search",
]


def model():
    path = os.environ.get("STOWAGE_EMBEDDING_MODEL_DIR")
    if not path:
        sys.exit("STOWAGE_EMBEDDING_MODEL_DIR is not set (eval \"$(scripts/stack env)\")")
    return SentenceTransformer(path, device="cpu")


def fixture(out):
    m = model()
    vectors = m.encode(SAMPLES, batch_size=32, normalize_embeddings=True)
    data = {
        "model": "all-MiniLM-L6-v2",
        "max_seq_length": m.max_seq_length,
        "samples": [
            {"text": t, "vector": [round(float(x), 7) for x in v]}
            for t, v in zip(SAMPLES, vectors)
        ],
    }
    # One sample per line: reviewable diffs, no 5,000-line file.
    lines = [json.dumps(s, ensure_ascii=False) for s in data.pop("samples")]
    head = json.dumps(data, ensure_ascii=False)[:-1]
    with open(out, "w", encoding="utf-8") as f:
        f.write(head + ', "samples": [\n' + ",\n".join(lines) + "\n]}\n")


def bench(path):
    with open(path, encoding="utf-8") as f:
        texts = json.load(f)
    m = model()
    m.encode(texts[:32], batch_size=32)  # warm-up, as the Rust side's load probe
    t0, c0 = time.perf_counter(), time.process_time()
    v = m.encode(texts, batch_size=32, normalize_embeddings=True)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    vectors = [[float(x) for x in row] for row in v]
    print(json.dumps({"texts": len(texts), "seconds": seconds, "cpu_seconds": cpu_seconds, "vectors": vectors}))


COMMANDS = {"fixture": fixture, "bench": bench}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](sys.argv[2])
