#!/usr/bin/env python3
"""Lists Rust functions by length (lines from `fn` to its closing brace),
outside #[cfg(test)] modules. Usage: fnlen.py DIR [MIN]"""
import os, re, sys

def functions(path):
    lines = open(path).read().split("\n")
    out = []
    i = 0
    in_test_mod_depth = None
    depth = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("#[cfg(test)]"):
            # skip the following item entirely
            j = i + 1
            while j < len(lines) and not re.search(r"\b(mod|fn)\b", lines[j]):
                j += 1
            d = 0; started = False
            while j < len(lines):
                d += lines[j].count("{") - lines[j].count("}")
                if "{" in lines[j]: started = True
                j += 1
                if started and d <= 0:
                    break
            i = j
            continue
        m = re.match(r"\s*(pub(\([^)]*\))?\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)", line)
        if m and not stripped.endswith(";"):
            name = m.group(5)
            d = 0; started = False; j = i
            while j < len(lines):
                code = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j])
                code = re.sub(r"'(\\.|[^'\\])'", "''", code)
                code = code.split("//")[0]
                d += code.count("{") - code.count("}")
                if "{" in code: started = True
                if started and d <= 0:
                    break
                if not started and code.strip().endswith(";"):
                    break
                j += 1
            out.append((j - i + 1, name, path, i + 1))
            i += 1
            continue
        i += 1
    return out

root = sys.argv[1]
minimum = int(sys.argv[2]) if len(sys.argv) > 2 else 0
res = []
for dp, _, fs in os.walk(root):
    for f in fs:
        if f.endswith(".rs"):
            res += functions(os.path.join(dp, f))
res.sort(reverse=True)
for n, name, path, line in res:
    if n >= minimum:
        print("%4d  %s  %s:%d" % (n, name, os.path.relpath(path, root), line))
