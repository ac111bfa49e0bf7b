#!/usr/bin/env python3
"""Render the "key value" lines of vm-tests/bench/compare.sh (bench.txt) as Markdown tables.

    vm-tests/bench/table.py target/vm-tests/runs/<run>/bench.txt [more bench.txt ...]
Several files (boots) are merged, a later one's figure winning for the same key.
Keys: n<N>.<profile>.<tool>_<step>.s|rss_kib|cpu_pct (one cell per file count and link profile).
A figure that is missing (its step failed or did not run) prints as "-".
"""
import re
import sys

r = {}
for path in sys.argv[1:]:
    for line in open(path):
        k, _, v = line.strip().partition(" ")
        try:
            r[k] = float(v)
        except ValueError:
            pass

MB = 1e6
MIB = 1 << 20
STEPS = ("full", "nochange", "change1", "restore")
TOOLS = (("e2e", "e2ebackup"), ("e2eb", "e2ebackup B (restore A/B)"),
         ("restic", "restic 0.14 (sftp)"), ("borg", "borg 1.2 (ssh)"))
PROFILE_NAMES = {"wan": "WAN (netem 25 ms each way, 50 Mbit/s)", "lo": "loopback"}


def g(k):
    return r.get(k)


def fmt(x, spec="{:.1f}"):
    return "-" if x is None else spec.format(x)


def ratio(a, b):
    return None if a is None or not b else a / b


cells = sorted({(int(m.group(1)), m.group(2)) for k in r
                for m in [re.match(r"n(\d+)\.(\w+)\.", k)] if m},
               key=lambda c: (c[0], c[1] != "wan"))
scales = sorted({n for n, _ in cells})
profiles = [p for p in ("wan", "lo") if any(c[1] == p for c in cells)]

print("Times in seconds under QEMU TCG on a shared 2-core host, one run per cell; "
      "(x) = the tool's time / e2ebackup's time, so above 1.00x e2ebackup is faster.\n")
for n, l in cells:
    c = f"n{n}.{l}"
    nb = g(f"dataset.n{n}.bytes")
    print(f"#### {n} files ({fmt(nb and nb / MIB, '{:.0f}')} MiB), {PROFILE_NAMES.get(l, l)}, "
          f"measured round trip {fmt(g(c + '.link.rtt_ms'))} ms\n")
    print("| tool | full backup | no change | 1% changed | restore | server bytes | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    base = {s: g(f"{c}.e2e_{s}.s") for s in STEPS}
    for tool, name in TOOLS:
        if not any(g(f"{c}.{tool}_{s}.s") is not None for s in STEPS):
            continue
        row = []
        for s in STEPS:
            t = g(f"{c}.{tool}_{s}.s")
            cell = fmt(t)
            if tool != "e2e" and t is not None and base[s]:
                cell += f" ({t / base[s]:.2f}x)"
            row.append(cell)
        srv = g(f"{c}.{tool}_server.bytes")
        rss = max((g(f"{c}.{tool}_{s}.rss_kib") or 0 for s in STEPS), default=0)
        row.append(fmt(srv and srv / MIB, "{:.0f} MiB"))
        row.append(fmt(rss / 1024 if rss else None, "{:.1f} MiB"))
        print(f"| {name} | " + " | ".join(row) + " |")
    ssh = g(c + ".limit_ssh_cat.s")
    if ssh is not None:
        x = f" ({ssh / base['full']:.2f}x)" if base["full"] else ""
        print(f"| raw `ssh cat > file` of the same bytes (tar) | {fmt(ssh)}{x} | | | | | |")
    print(f"\nCell wall time {fmt(g(c + '.wall.s'), '{:.0f}')} s.\n")

# No-change slope: seconds per 10k files between consecutive file counts.
pairs = list(zip(scales, scales[1:]))
if pairs:
    print("No-change run against the file count (seconds; slope = seconds per 10k files):\n")
    hdr = " | ".join(f"{n} files" for n in scales) + " | " + " | ".join(f"slope {a}-{b}" for a, b in pairs)
    print(f"| link | tool | {hdr} |")
    print("|---|---|" + "---|" * (len(scales) + len(pairs)))
    for l in profiles:
        for tool, name in TOOLS:
            ts = [g(f"n{n}.{l}.{tool}_nochange.s") for n in scales]
            if all(t is None for t in ts):
                continue
            sl = [fmt(None if ta is None or tb is None else (tb - ta) / (b - a) * 1e4, "{:.2f}")
                  for (a, b), ta, tb in zip(pairs, ts, ts[1:])]
            print(f"| {l} | {name} | " + " | ".join(fmt(t) for t in ts) + " | " + " | ".join(sl) + " |")
    print()


def slope(l, tool):
    if len(scales) < 2:
        return None
    a, b = scales[0], scales[1]
    ta, tb = g(f"n{a}.{l}.{tool}_nochange.s"), g(f"n{b}.{l}.{tool}_nochange.s")
    return None if ta is None or tb is None else (tb - ta) / (b - a) * 1e4


print("Peak RSS of the e2ebackup process (VmHWM; rsync, ssh and sshfs are its children, not counted):\n")
print("| files | " + " | ".join(f"{s} ({l})" for l in profiles for s in STEPS) + " |")
print("|---|" + "---|" * (len(profiles) * len(STEPS)))
for n in scales:
    row = [fmt((g(f"n{n}.{l}.e2e_{s}.rss_kib") or 0) / 1024 or None, "{:.1f} MiB") for l in profiles for s in STEPS]
    print(f"| {n} | " + " | ".join(row) + " |")
print()

# Guest CPU use per step (keys .cpu_pct, recorded since run 5): near 100 % the emulated CPU
# is the limit, not the link.
if any(k.endswith(".cpu_pct") for k in r):
    print("Guest CPU busy during each step (% of all vCPUs; near 100 = CPU-bound under emulation):\n")
    print("| cell | tool | " + " | ".join(STEPS) + " |")
    print("|---|---|" + "---|" * len(STEPS))
    for n, l in cells:
        for tool, name in TOOLS:
            row = [g(f"n{n}.{l}.{tool}_{s}.cpu_pct") for s in STEPS]
            if any(v is not None for v in row):
                print(f"| {n} {l} | {name} | " + " | ".join(fmt(v, "{:.0f}") for v in row) + " |")
    print()

# Targets of issue 16, where this run has the figures.
print("Targets (issue 16), ratio = peer time / e2ebackup time:\n")
print("| target | cell | measured | met |")
print("|---|---|---|---|")


def target(name, cell, val, ok, spec="{:.2f}x"):
    if val is not None:
        print(f"| {name} | {cell} | {spec.format(val)} | {'yes' if ok(val) else 'no'} |")


for n in scales:
    c = f"n{n}.wan"
    e = g(c + ".e2e_full.s")
    target("WAN full >= 0.8x raw ssh cat throughput", f"{n} files", ratio(g(c + ".limit_ssh_cat.s"), e), lambda v: v >= 0.8)
    target("WAN full faster than restic", f"{n} files", ratio(g(c + ".restic_full.s"), e), lambda v: v > 1.0)
    target("WAN full faster than borg", f"{n} files", ratio(g(c + ".borg_full.s"), e), lambda v: v > 1.0)
if 20000 in scales:
    c = "n20000.wan"
    target("WAN no change >= 1.0x restic", "20000 files", ratio(g(c + ".restic_nochange.s"), g(c + ".e2e_nochange.s")), lambda v: v >= 1.0)
se, sr = slope("wan", "e2e"), slope("wan", "restic")
if se is not None and sr is not None:
    print(f"| WAN no-change slope no worse than restic's | {scales[0]}-{scales[1]} files | "
          f"e2ebackup {se:.2f} s/10k, restic {sr:.2f} s/10k | {'yes' if se <= sr else 'no'} |")
for l in profiles:
    for n in scales:
        c = f"n{n}.{l}"
        target(f"restore >= 1.0x restic ({l})", f"{n} files", ratio(g(c + ".restic_restore.s"), g(c + ".e2e_restore.s")), lambda v: v >= 1.0)
        target(f"restore >= 1.0x restic ({l}), binary B", f"{n} files", ratio(g(c + ".restic_restore.s"), g(c + ".e2eb_restore.s")), lambda v: v >= 1.0)
if 100000 in scales:
    rss = max((g(f"n100000.{l}.e2e_{s}.rss_kib") or 0) for l in profiles for s in STEPS) / 1024
    target("peak RSS of run < 30 MiB", "100000 files", rss or None, lambda v: v < 30, "{:.1f} MiB")
print()
if g("bench.matrix.wall.s"):
    print(f"Matrix wall time (every cell, data generation included): {g('bench.matrix.wall.s'):.0f} s.\n")

# ---------------------------------------------------------------- optional sections
if g("layer.mib"):
    print(f"Layers, {fmt(g('layer.mib'), '{:.0f}')} MiB written through each and flushed (MB/s):\n")
    print("| SSH cipher | ssh cat (handshake left out) | file on sshfs | direct-I/O loop on sshfs | dm-crypt on that loop |")
    print("|---|---|---|---|---|")
    lm = (g("layer.mib") or 0) * MIB
    for tag, name in (("chacha", "chacha20-poly1305 (OpenSSH default)"), ("aesgcm", "aes128-gcm")):
        hs = g(f"layer.{tag}.handshake.s") or 0
        ssh_s = g(f"layer.{tag}.ssh.s")
        rate = lambda s: None if not s else lm / s / MB
        cells_ = [fmt(rate(ssh_s - hs if ssh_s and ssh_s > hs else None)) + f" (handshake {hs:.1f} s)"]
        cells_ += [fmt(rate(g(f"layer.{tag}.{x}.s"))) for x in ("sshfs", "loop", "dmcrypt")]
        print(f"| {name} | " + " | ".join(cells_) + " |")
    print()

pts = []
for gib in (1, 2, 4, 8, 16, 32, 64):
    e, c = g(f"alloc.e2e.{gib}G.bytes"), g(f"alloc.recipe.{gib}G.bytes")
    if e is None and c is None:
        continue
    if not pts:
        print("Server bytes allocated right after init (LUKS2 header included):\n")
        print("| container | e2ebackup init | init time (s) | blog recipe (mkfs defaults, no lazy init) | recipe / e2ebackup |")
        print("|---|---|---|---|---|")
    pts.append((gib, e, c))
    print(f"| {gib} GiB | {fmt(e and e / MIB, '{:.0f} MiB')} | {fmt(g(f'e2e_init_{gib}G.s'))} | "
          f"{fmt(c and c / MIB, '{:.0f} MiB')} | {fmt(ratio(c, e), '{:.1f}x')} |")

# ---------------------------------------------------------------- where e2ebackup's time goes
# From the e2ebackup logs next to bench.txt (bench-<cell>.e2e_<step>.log): the seconds
# between its info lines (1-second resolution).
import datetime
import glob
import os

MARKS = (("connecting to", "preflight (libssh2)"), ("mounting ", "sshfs mount, lock, loop"),
         ("unlocking ", "LUKS open, mount"), ("snapshot ", "rsync, manifest, sync"),
         ("restoring snapshot", "rsync, manifest, sync"), ("committed (", "teardown"), ("restore of", "teardown"))
rows = []
for n, l in cells:
    for tool in ("e2e", "e2eb"):
        for s in STEPS:
            found = [f for f in (os.path.join(os.path.dirname(a), f"bench-n{n}.{l}.{tool}_{s}.log")
                                 for a in sys.argv[1:]) if os.path.exists(f)]
            if not found:
                continue
            f = found[-1]
            marks = []
            for line in open(f, errors="replace"):
                ts, _, msg = line.partition(" ")
                try:
                    t = datetime.datetime.strptime(ts, "%Y%m%dT%H%M%SZ").timestamp()
                except ValueError:
                    continue
                for m, name in MARKS:
                    if msg.startswith(m) and not (m == "snapshot " and "committed" in msg):
                        marks.append((t, name))
                        break
                    if m == "committed (" and m in msg:
                        marks.append((t, name))
                        break
            total = g(f"n{n}.{l}.{tool}_{s}.s")
            if len(marks) < 2 or total is None:
                continue
            split = {}
            for (ta, na), (tb, _) in zip(marks, marks[1:]):
                split[na] = split.get(na, 0) + tb - ta
            # The last phase runs to the process's end (wall time measured outside).
            last = marks[-1][1]
            split[last] = split.get(last, 0) + max(0.0, total - (marks[-1][0] - marks[0][0]))
            rows.append((f"n{n}.{l}", f"{tool}_{s}", total, split))
if rows:
    cols = ["preflight (libssh2)", "sshfs mount, lock, loop", "LUKS open, mount", "rsync, manifest, sync", "teardown"]
    print("Where e2ebackup's time goes (seconds between its log lines, 1 s resolution; "
          "the last phase includes the process exit):\n")
    print("| cell | step | total | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for c, step, total, split in rows:
        print(f"| {c} | {step} | {total:.1f} | " + " | ".join(fmt(split.get(k), "{:.0f}") for k in cols) + " |")
