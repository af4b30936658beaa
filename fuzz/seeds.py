#!/usr/bin/env python3
"""Writes fuzz seeds from the repository's fixtures into corpus/<target>/.

usage: python3 fuzz/seeds.py

- pgoutput_decode: every message of tests/fixtures/pgoutput/*.hex (real
  bytes from PostgreSQL 15 and 18), one file each.
- array_parse: every array value of tests/fixtures/values/values.tsv, as
  byte 0 = element kind, byte 1 = delimiter (0 ',', 1 ';'), then the text.
- value_text: every value of values.tsv whose type is in value_text's OIDS,
  as byte 0 = index into OIDS, then the text.

File names are content hashes, as libFuzzer names them, so running it twice
adds nothing. Then minimize with `cargo +nightly fuzz cmin <target>`.
"""
import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

# fuzz_targets/kinds.rs kind(); value_text.rs OIDS. Keep in step.
KINDS = ["bool", "int", "float", "numeric", "text", "json", "bytea", "date",
         "timestamp", "timestamptz"]
OIDS = [16, 20, 21, 23, 26, 700, 701, 1700, 114, 3802, 17, 1082, 1114, 1184,
        25, 1043, 2950, 1186, 1000, 1007, 1021, 1231, 3807, 1001, 1182, 1115,
        1185, 1020, 1009]


def write(target, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def pgoutput():
    d = os.path.join(FIXTURES, "pgoutput")
    n = 0
    for name in sorted(os.listdir(d)):
        if not name.endswith(".hex"):
            continue
        for line in open(os.path.join(d, name)):
            line = line.strip()
            if line and not line.startswith("#"):
                write("pgoutput_decode", bytes.fromhex(line))
                n += 1
    return n


def values():
    arrays = scalars = 0
    for line in open(os.path.join(FIXTURES, "values", "values.tsv"), encoding="utf-8"):
        if line.startswith("#"):
            continue
        _, _, oid, spec, text, _ = line.rstrip("\n").split("\t")
        text = json.loads(text).encode()
        if spec.startswith("array"):
            # "array,<elem>", "array;<elem>" (box[]) or "array,array,int"
            delim = 1 if spec[5] == ";" else 0
            elem = spec[6:]
            kind = 10 if elem == "array,int" else KINDS.index(elem)
            write("array_parse", bytes([kind, delim]) + text)
            arrays += 1
        if int(oid) in OIDS:
            write("value_text", bytes([OIDS.index(int(oid))]) + text)
            scalars += 1
    return arrays, scalars


if __name__ == "__main__":
    print("pgoutput_decode:", pgoutput())
    a, s = values()
    print("array_parse:", a, "value_text:", s)
