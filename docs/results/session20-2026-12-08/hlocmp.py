import re, collections, sys
def norm(text):
    text = text[text.index("\n\n", text.index("StackFrames")):] if "StackFrames" in text else text
    lines = []
    for line in text.splitlines():
        line = re.sub(r"%[\w.\-]+", "%x", line)
        line = re.sub(r"index=\d+", "index=N", line)
        line = re.sub(r"\b[\w\-]+\.\d+\b", "NAME", line)
        lines.append(line.strip())
    return collections.Counter(lines)
a, b = sys.argv[1], sys.argv[2]
for f in sys.argv[3:]:
    x = norm(open(f"{a}-{f}.txt").read()); y = norm(open(f"{b}-{f}.txt").read())
    print("==", f, sum(x.values()), sum(y.values()), "identical multiset" if x == y else "DIFFERENT")
    for k in (x - y): print("  -", x[k]-y[k], k[:220])
    for k in (y - x): print("  +", y[k]-x[k], k[:220])
