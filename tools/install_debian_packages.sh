#!/usr/bin/env bash
# Install the Debian packages a command needs, and leave their system services
# neither running nor enabled: our own processes start these programs on
# ports chosen at run time and stop them by PID, so a system-wide HAProxy or
# Redis would only be one more daemon on the user's machine.
#
#   tools/install_debian_packages.sh PACKAGE[:PROGRAM] ...
#
# PROGRAM (default: PACKAGE) is what must be found afterwards; a package whose
# program is already there is skipped, so nothing the user installed, and no
# service the user enabled, is touched. For the packages installed here:
#   - during apt-get, /usr/sbin/policy-rc.d answers 101 (the Debian way to say
#     "do not start services"), unless the machine already has a policy;
#   - afterwards their systemd units and init scripts are disabled, because
#     a package's postinst enables its service for the next boot.
# Root runs apt-get directly; anyone else through sudo.
set -euo pipefail

sudo_=()
[ "$(id -u)" = 0 ] || sudo_=(sudo)

found() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
programs=()
for spec in "$@"; do
  package=${spec%%:*}
  program=${spec#*:}
  if ! found "$program"; then
    missing+=("$package")
    programs+=("$program")
  fi
done
[ ${#missing[@]} -gt 0 ] || exit 0

policy=/usr/sbin/policy-rc.d
placed=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# placed by sutra-embed tools/install_debian_packages.sh while apt-get runs\nexit 101\n' \
    | "${sudo_[@]}" tee "$policy" >/dev/null
  "${sudo_[@]}" chmod 755 "$policy"
  placed=1
fi
cleanup() { if [ -n "$placed" ]; then "${sudo_[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

echo "installing Debian packages: ${missing[*]} (their services stay disabled)"
"${sudo_[@]}" apt-get update -qq
"${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"

for package in "${missing[@]}"; do
  while read -r path; do
    case "$path" in
      /lib/systemd/system/*.service|/usr/lib/systemd/system/*.service)
        unit=$(basename "$path")
        case "$unit" in *@.service) continue ;; esac
        if [ -d /run/systemd/system ]; then
          "${sudo_[@]}" systemctl disable --now "$unit" >/dev/null 2>&1 || true
        else
          "${sudo_[@]}" deb-systemd-helper disable "$unit" >/dev/null 2>&1 || true
        fi ;;
      /etc/init.d/*)
        "${sudo_[@]}" update-rc.d "$(basename "$path")" disable >/dev/null 2>&1 || true ;;
    esac
  done < <(dpkg -L "$package")
done

for program in "${programs[@]}"; do
  found "$program" || { echo "apt-get finished but $program was not found" >&2; exit 1; }
done
