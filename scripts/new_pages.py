#!/usr/bin/env python3
"""Writes, for each RAM image given, the 4 KiB pages not seen before in it or in any
earlier image (in order) to OUTDIR/new<k>.bin, and prints the page counts.

The input of the "what the content allows" figures in docs/BENCHMARKS.md §3: compress
new0.bin with any compressor to see what the first guest's own content costs, and
newK.bin with `zstd --patch-from=new0.bin` to see what the later guests cost with all
of the first guest as context.

usage: scripts/new_pages.py OUTDIR IMAGE...
"""
import hashlib
import os
import sys

PAGE = 4096


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir, images = sys.argv[1], sys.argv[2:]
    os.makedirs(out_dir, exist_ok=True)
    seen = set()
    for k, path in enumerate(images):
        n = 0
        with open(path, "rb") as f, open(os.path.join(out_dir, f"new{k}.bin"), "wb") as out:
            while True:
                page = f.read(PAGE)
                if not page:
                    break
                h = hashlib.blake2b(page, digest_size=16).digest()
                if h in seen:
                    continue
                seen.add(h)
                out.write(page)
                n += 1
        print(f"{path}: {n} new pages")


if __name__ == "__main__":
    main()
