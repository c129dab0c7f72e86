#!/usr/bin/env python3
"""Self-check for the PostgreSQL 15 labelled retrieval set (python3 stdlib only).

Usage:
    python3 check.py HTML_DIR [QUESTIONS_JSONL]

HTML_DIR is the html/ directory of Debian's postgresql-doc-15 package
(/usr/share/doc/postgresql-doc-15/html, or wherever the .deb was extracted).
QUESTIONS_JSONL defaults to questions.jsonl next to this script.

Checks: one JSON object per line with exactly the keys id, style, question,
relevant, note; ids unique and of the form qNNN; style is "keyword" or
"paraphrase" and keyword questions are about a third of the set; every
relevant page is a plain file name that exists in HTML_DIR and is not a
generated index page; grades are 1 or 2; every question has at least one
grade-2 page. Prints counts; exits 1 on the first class of error found.
"""

import collections
import json
import os
import re
import sys

KEYS = {"id", "style", "question", "relevant", "note"}
STYLES = ("keyword", "paraphrase")
# Generated index/navigation pages that must never be marked relevant.
FORBIDDEN = {"bookindex.html", "index.html"}
MIN_QUESTIONS = 60


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 2
    html_dir = argv[1]
    path = argv[2] if len(argv) > 2 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "questions.jsonl")
    if not os.path.isdir(html_dir):
        print(f"FAIL: {html_dir} is not a directory")
        return 1

    errors = []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                errors.append(f"line {n}: empty line")
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                errors.append(f"line {n}: invalid JSON: {e}")

    ids = collections.Counter()
    styles = collections.Counter()
    grades = collections.Counter()
    pages = collections.Counter()
    questions = collections.Counter()
    for n, q in rows:
        where = f"line {n} ({q.get('id', '?')})" if isinstance(q, dict) else f"line {n}"
        if not isinstance(q, dict):
            errors.append(f"{where}: not an object")
            continue
        if set(q) != KEYS:
            errors.append(f"{where}: keys {sorted(q)} != {sorted(KEYS)}")
            continue
        if not isinstance(q["id"], str) or not re.fullmatch(r"q\d{3,}", q["id"]):
            errors.append(f"{where}: bad id {q['id']!r}")
        ids[q["id"]] += 1
        if q["style"] not in STYLES:
            errors.append(f"{where}: bad style {q['style']!r}")
        styles[q["style"]] += 1
        if not isinstance(q["question"], str) or not q["question"].strip():
            errors.append(f"{where}: empty question")
        else:
            questions[q["question"].strip().lower()] += 1
        if not isinstance(q["note"], str) or not q["note"].strip():
            errors.append(f"{where}: empty note")
        rel = q["relevant"]
        if not isinstance(rel, dict) or not rel:
            errors.append(f"{where}: relevant must be a non-empty object")
            continue
        for page, grade in rel.items():
            if "/" in page or not page.endswith(".html"):
                errors.append(f"{where}: {page!r} is not a file name relative to html/")
            elif page in FORBIDDEN:
                errors.append(f"{where}: {page} is a generated index page")
            elif not os.path.isfile(os.path.join(html_dir, page)):
                errors.append(f"{where}: {page} does not exist in {html_dir}")
            if grade not in (1, 2) or isinstance(grade, bool):
                errors.append(f"{where}: grade {grade!r} for {page} not in {{1, 2}}")
            grades[grade] += 1
            pages[page] += 1
        if 2 not in rel.values():
            errors.append(f"{where}: no grade-2 page")

    for i, c in ids.items():
        if c > 1:
            errors.append(f"id {i} used {c} times")
    for text, c in questions.items():
        if c > 1:
            errors.append(f"question repeated {c} times: {text!r}")
    total = len(rows)
    if total < MIN_QUESTIONS:
        errors.append(f"only {total} questions (< {MIN_QUESTIONS})")
    if total:
        share = styles["keyword"] / total
        if not 0.25 <= share <= 0.40:
            errors.append(f"keyword share {share:.2f} is not about a third")

    print(f"questions:        {total}")
    for s in STYLES:
        print(f"  {s:<15} {styles[s]}")
    print(f"judgements:       {sum(grades.values())} "
          f"(grade 2: {grades[2]}, grade 1: {grades[1]})")
    print(f"relevant pages per question: "
          f"{sum(grades.values()) / max(total, 1):.2f} on average")
    print(f"distinct relevant pages: {len(pages)} "
          f"(of {sum(1 for f in os.listdir(html_dir) if f.endswith('.html'))} html pages)")
    if errors:
        print(f"FAIL: {len(errors)} problem(s)")
        for e in errors:
            print("  " + e)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
