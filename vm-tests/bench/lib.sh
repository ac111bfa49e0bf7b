# Sourced by the bench scenarios after lib/common.sh.
#   small_tree DIR N   N files of 2 KiB of random bytes in 280 directories (40 x 7), as
#                      phases.sh and prefetch.sh walk them.
small_tree() {
  python3 - "$1" "$2" <<'PY'
import os, sys
for i in range(int(sys.argv[2])):
    d = os.path.join(sys.argv[1], "d%02d" % (i % 40), "s%d" % (i % 7))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(os.urandom(2048))
PY
}
