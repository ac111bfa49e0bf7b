#!/usr/bin/env python3
"""Render the "key value" lines of vm-tests/bench/compare.sh (bench.txt) as Markdown tables.

    vm-tests/bench/table.py target/vm-tests/runs/<run>/bench.txt
A figure that is missing (its step failed) prints as "-".
"""
import sys

r = {}
for line in open(sys.argv[1]):
    k, _, v = line.strip().partition(" ")
    try:
        r[k] = float(v)
    except ValueError:
        pass

MB = 1e6
MIB = 1 << 20


def g(k):
    return r.get(k)


def fmt(x, spec="{:.1f}"):
    return "-" if x is None else spec.format(x)


def rate(nbytes, s):
    return None if nbytes is None or not s else nbytes / s / MB


def ratio(a, b):
    return None if a is None or not b else a / b


size = g("dataset.bytes")
print(f"Data set: {fmt(g('dataset.files'), '{:.0f}')} files, {fmt(size and size / MIB, '{:.0f}')} MiB "
      "(random, incompressible). Times in seconds under QEMU TCG; x = time / e2ebackup's time.\n")
print("| tool | full backup | MB/s | no change | 1% changed | restore | MB/s | server bytes after 3 runs | peak RSS |")
print("|---|---|---|---|---|---|---|---|---|")
base = {s: g(f"e2e_{s}.s") for s in ("full", "nochange", "change1", "restore")}
for tool, name in (("e2e", "e2ebackup"), ("restic", "restic 0.14 (sftp)"), ("borg", "borg 1.2 (ssh)")):
    cells = []
    for step in ("full", "nochange", "change1", "restore"):
        s = g(f"{tool}_{step}.s")
        c = fmt(s)
        if tool != "e2e" and s is not None and base[step]:
            c += f" ({ratio(s, base[step]):.2f}x)"
        cells.append(c)
        if step in ("full", "restore"):
            cells.append(fmt(rate(size, s)))
    srv = g(f"{tool}_server.bytes")
    rss = max((g(f"{tool}_{s}.rss_kib") or 0 for s in ("full", "nochange", "change1", "restore")), default=0)
    cells.append(fmt(srv and srv / MIB, "{:.0f} MiB"))
    cells.append(fmt(rss / 1024 if rss else None, "{:.0f} MiB"))
    print(f"| {name} | " + " | ".join(cells) + " |")
ssh = g("limit_ssh_cat.s")
print(f"| limit: `ssh cat > file` of the same bytes (tar) | {fmt(ssh)} | {fmt(rate(size, ssh))} | | | | | | |")
loc = g("limit_local_dmcrypt_write.s")
print(f"| limit: dm-crypt on a local loop, no network | {fmt(loc)} | {fmt(rate(size, loc))} | | | | | | |")
full = base["full"]
if full and ssh:
    print(f"\ne2ebackup full backup: {full / ssh:.2f}x the time of the raw ssh transfer of the same bytes.")

print(f"\nLayers, {fmt(g('layer.mib'), '{:.0f}')} MiB written through each and flushed (MB/s):\n")
print("| SSH cipher | ssh cat (handshake left out) | file on sshfs | direct-I/O loop on sshfs | dm-crypt on that loop |")
print("|---|---|---|---|---|")
lm = (g("layer.mib") or 0) * MIB
for tag, name in (("chacha", "chacha20-poly1305 (OpenSSH default)"), ("aesgcm", "aes128-gcm")):
    hs = g(f"layer.{tag}.handshake.s") or 0
    ssh_s = g(f"layer.{tag}.ssh.s")
    cells = [fmt(rate(lm, ssh_s - hs if ssh_s and ssh_s > hs else None)) + f" (handshake {hs:.1f} s)"]
    cells += [fmt(rate(lm, g(f"layer.{tag}.{l}.s"))) for l in ("sshfs", "loop", "dmcrypt")]
    print(f"| {name} | " + " | ".join(cells) + " |")

print("\nServer bytes allocated right after init (LUKS2 header included):\n")
print("| container | e2ebackup init | init time (s) | blog recipe (mkfs defaults, no lazy init) | recipe / e2ebackup |")
print("|---|---|---|---|---|")
pts = []
for gib in (1, 2, 4, 8, 16, 32, 64):
    e, c = g(f"alloc.e2e.{gib}G.bytes"), g(f"alloc.recipe.{gib}G.bytes")
    if e is None and c is None:
        continue
    pts.append((gib, e, c))
    print(f"| {gib} GiB | {fmt(e and e / MIB, '{:.0f} MiB')} | {fmt(g(f'e2e_init_{gib}G.s'))} | "
          f"{fmt(c and c / MIB, '{:.0f} MiB')} | {fmt(ratio(c, e), '{:.1f}x')} |")
if len(pts) >= 2 and all(p[1] and p[2] for p in pts[-2:]):
    (g1, e1, c1), (g2, e2, c2) = pts[-2:]
    ext = lambda a, b: b + (b - a) / (g2 - g1) * (1024 - g2)
    print(f"| 1 TiB (linear from {g1} and {g2} GiB) | {ext(e1, e2) / (1 << 30):.1f} GiB | | "
          f"{ext(c1, c2) / (1 << 30):.1f} GiB | {ext(c1, c2) / ext(e1, e2):.1f}x |")
