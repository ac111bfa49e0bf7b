#!/bin/bash
# timeout: 300
# Issue 7 (packaging): the Debian package built by scripts/build-deb.sh (found in the
# repository's target/debian/) installs on this root (a tmpfs overlay over the host's, which
# has every dependency), its man pages render, the bash completion completes, the examples
# and the directories are there with their modes, `schedule --install` writes units that
# pass `systemd-analyze verify` (without systemd running it does not call systemctl and exits
# 3; with it, it enables the timer), and removing the package removes the binary.
# Needs no server: nothing here connects anywhere.
source "$(dirname "$0")/../lib/common.sh"

DEB=$(ls "$E2E_REPO"/target/debian/e2ebackup_*.deb 2>/dev/null | sort -V | tail -1)
if [ -z "$DEB" ]; then
  fail "no-deb: no target/debian/e2ebackup_*.deb in the repository: run scripts/build-deb.sh first"
  exit 1
fi
echo "package: $DEB"
export MANPAGER=cat PAGER=cat MANWIDTH=100
# The man-db trigger would rebuild the whole man index after dpkg -i (minutes under TCG);
# without this file it does nothing (Debian's documented switch). This root is a tmpfs overlay.
rm -f /var/lib/man-db/auto-update
# No systemd runs as PID 1 here, so the real systemctl cannot enable anything: a stub records
# what `schedule --install` asks of it (the overlay hides the change from the host), once
# /run/systemd/system (what `schedule` tests, like sd_booted(3)) is made to exist.
mkdir -p /run/e2e-pkg
cat > /run/e2e-pkg/systemctl <<'EOF'
#!/bin/sh
echo "$*" >> /run/e2e-pkg/systemctl.calls
EOF
chmod 755 /run/e2e-pkg/systemctl
mount --bind /run/e2e-pkg/systemctl /usr/bin/systemctl

mode_is() { [ "$(stat -c %a "$2")" = "$1" ] || { echo "$2: mode $(stat -c %a "$2"), want $1"; return 1; }; }
man_has() {  # man_has PAGE WORD...: the page renders and contains every WORD
  local out w; out=$(man -P cat "$1" 2>&1) || { echo "$out"; return 1; }
  for w in "${@:2}"; do grep -q -- "$w" <<<"$out" || { echo "man $1: no '$w' in: $out"; return 1; }; done
}
completes() {  # completes WORDS... EXPECTED: the bash completion of WORDS offers EXPECTED
  local want=${*: -1}
  bash -c 'source /usr/share/bash-completion/completions/e2ebackup
    COMP_WORDS=("${@:1:$#-1}"); COMP_CWORD=$(($# - 2)); COMP_LINE="${*:1:$#-1}"; COMP_POINT=${#COMP_LINE}
    _e2ebackup e2ebackup "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf "%s\n" "${COMPREPLY[@]}" | grep -qx -- "${@: -1}" || { echo "offered: ${COMPREPLY[*]}"; exit 1; }' \
    _ "${@:1:$#-1}" "$want"
}

check dpkg-install dpkg -i "$DEB"
check dpkg-status-installed bash -c "dpkg-query -W -f='\${Status}' e2ebackup | grep -qx 'install ok installed'"
check version bash -c '/usr/bin/e2ebackup --version | grep -q "^e2ebackup [0-9]"'
check man-main man_has e2ebackup SYNOPSIS run restore schedule
check man-run man_has e2ebackup-run SYNOPSIS PROFILE
check man-nested-page bash -c 'zcat /usr/share/man/man1/e2ebackup-keys-verify.1.gz | grep -q identity'   # man costs ~5 s a call here
check man-pages-compressed test -f /usr/share/man/man1/e2ebackup.1.gz
check no-generator-page test ! -e /usr/share/man/man1/e2ebackup-generate-assets.1.gz
check bash-completion-registers bash -c 'source /usr/share/bash-completion/completions/e2ebackup && complete -p e2ebackup'
check bash-completes-subcommand completes e2ebackup res restore
check bash-completes-option completes e2ebackup schedule --ins --install
check zsh-completion test -s /usr/share/zsh/vendor-completions/_e2ebackup
check fish-completion test -s /usr/share/fish/vendor_completions.d/e2ebackup.fish
check examples bash -c 'ls /usr/share/doc/e2ebackup/examples/example.yaml /usr/share/doc/e2ebackup/examples/demo.yaml'
check docs bash -c 'ls /usr/share/doc/e2ebackup/README.md /usr/share/doc/e2ebackup/docs/profile.md /usr/share/doc/e2ebackup/docs/threat-model.md'
check example-profile-parses bash -c 'install -m 0600 /usr/share/doc/e2ebackup/examples/example.yaml /etc/e2ebackup/profiles/pkgex.yaml &&
  e2ebackup schedule pkgex >/dev/null'
check dir-etc mode_is 755 /etc/e2ebackup
check dir-profiles mode_is 700 /etc/e2ebackup/profiles
check dir-keys mode_is 700 /etc/e2ebackup/keys
check dir-state mode_is 700 /var/lib/e2ebackup

# Without systemd: the units are written, systemctl is not called, a warning says how to
# enable the timer, exit 3.
check schedule-install-no-systemd bash -c '[ ! -e /run/systemd/system ] || { echo "/run/systemd/system exists"; exit 1; }
  out=$(e2ebackup schedule pkgex --install --on-calendar "*-*-* 03:17:00" 2>&1); rc=$?; echo "$out"
  [ $rc -eq 3 ] && grep -q "systemctl enable --now e2ebackup-pkgex.timer" <<<"$out" && [ ! -e /run/e2e-pkg/systemctl.calls ]'
check units-written-no-systemd test -s /etc/systemd/system/e2ebackup-pkgex.timer
# "With systemd": the stub systemctl records daemon-reload and enable.
mkdir -p /run/systemd/system
check schedule-install e2ebackup schedule pkgex --install --on-calendar '*-*-* 03:17:00'
rmdir /run/systemd/system /run/systemd 2>/dev/null
check units-written bash -c 'grep -qx "ExecStart=/usr/bin/e2ebackup run /etc/e2ebackup/profiles/pkgex.yaml" /etc/systemd/system/e2ebackup-pkgex.service &&
  grep -qx "OnCalendar=\*-\*-\* 03:17:00" /etc/systemd/system/e2ebackup-pkgex.timer'
check timer-enabled bash -c 'grep -qx "daemon-reload" /run/e2e-pkg/systemctl.calls && grep -qx "enable --now e2ebackup-pkgex.timer" /run/e2e-pkg/systemctl.calls'
check systemd-analyze-verify bash -c 'out=$(systemd-analyze verify /etc/systemd/system/e2ebackup-pkgex.service /etc/systemd/system/e2ebackup-pkgex.timer 2>&1); rc=$?; echo "$out"; [ $rc -eq 0 ] && ! grep -q "e2ebackup-pkgex" <<<"$out"'

check dpkg-remove dpkg -r e2ebackup
check binary-gone test ! -e /usr/bin/e2ebackup
check man-gone test ! -e /usr/share/man/man1/e2ebackup.1.gz
check keys-dir-kept test -d /etc/e2ebackup/keys
umount /usr/bin/systemctl
rm -f /etc/systemd/system/e2ebackup-pkgex.* /etc/e2ebackup/profiles/pkgex.yaml
