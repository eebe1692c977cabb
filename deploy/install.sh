#!/usr/bin/env bash
# Installs meshmeet as a systemd service on a Debian or Ubuntu VPS.
#
#   deploy/install.sh DOMAIN [options]
#
# By default the server obtains and renews a trusted certificate for DOMAIN itself
# (ACME, Let's Encrypt): DOMAIN's DNS must point at this machine and TCP 443 (or 80)
# must be open. An IP address or a name without a dot gets a self-signed certificate.
#
# Options:
#   --binary PATH      install this meshmeet binary instead of building one from this
#                      checkout (cargo build --release)
#   --email E          contact address for the ACME account (expiry notices)
#   --acme-directory URL  another ACME CA (default Let's Encrypt production; staging:
#                      https://acme-staging-v02.api.letsencrypt.org/directory)
#   --self-signed      no ACME: a self-signed certificate for DOMAIN (browsers warn)
#   --cert PATH        PEM certificate chain obtained elsewhere, e.g. by certbot
#                      (/etc/letsencrypt/live/DOMAIN/fullchain.pem); no ACME then
#   --key PATH         its PEM private key (/etc/letsencrypt/live/DOMAIN/privkey.pem);
#                      both are copied to /etc/meshmeet/tls/ readable by the service, and
#                      a certbot deploy hook keeps the copies fresh.
#   --https-port N     HTTPS port (default 443)
#   --http-port N      plain-HTTP redirect port (default 80; 0 = off)
#   --external-ip IP   public address when the VPS sits behind 1:1 NAT (clouds)
#   --relay-ports A-B  UDP range for TURN relays (default 49152-65535)
#   --root DIR         install into DIR instead of / (packaging, tests): touches nothing
#                      outside DIR, creates no user, starts nothing
#   --no-start         install but do not (re)start the service
#   --uninstall        stop and remove the service and binary (config and state kept;
#                      add --purge to remove them too)
#
# A second run upgrades: the binary and unit are replaced; the config, the TURN secret
# and the state under /var/lib/meshmeet are kept.
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

ROOT=""
DOMAIN=""
BINARY=""
CERT=""
KEY=""
EMAIL=""
ACME_DIRECTORY=""
SELF_SIGNED=0
HTTPS_PORT=443
HTTP_PORT=80
EXTERNAL_IP=""
RELAY_PORTS="49152-65535"
START=1
UNINSTALL=0
PURGE=0

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="${2:?--binary needs a path}"; shift 2 ;;
    --cert) CERT="${2:?--cert needs a path}"; shift 2 ;;
    --key) KEY="${2:?--key needs a path}"; shift 2 ;;
    --email) EMAIL="${2:?--email needs an address}"; shift 2 ;;
    --acme-directory) ACME_DIRECTORY="${2:?--acme-directory needs a URL}"; shift 2 ;;
    --self-signed) SELF_SIGNED=1; shift ;;
    --https-port) HTTPS_PORT="${2:?}"; shift 2 ;;
    --http-port) HTTP_PORT="${2:?}"; shift 2 ;;
    --external-ip) EXTERNAL_IP="${2:?}"; shift 2 ;;
    --relay-ports) RELAY_PORTS="${2:?}"; shift 2 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --no-start) START=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$DOMAIN" ] || die "unexpected argument $1"; DOMAIN="$1"; shift ;;
  esac
done

ROOT="${ROOT%/}"
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
  [ "$ROOT" != "/" ] || ROOT=""
fi
LIVE=0; [ -z "$ROOT" ] && LIVE=1
[ "$LIVE" = 0 ] || [ "$(id -u)" = 0 ] || die "run as root (or use --root DIR)"

HERE="$(cd "$(dirname "$0")" && pwd)"
SRC="$(cd "$HERE/.." && pwd)"
BIN_DST="$ROOT/usr/local/bin/meshmeet"
ETC="$ROOT/etc/meshmeet"
CONF="$ETC/meshmeet.toml"
UNIT="$ROOT/etc/systemd/system/meshmeet.service"
STATE="$ROOT/var/lib/meshmeet"
HOOK_DIR="$ROOT/etc/letsencrypt/renewal-hooks/deploy"
HOOK="$HOOK_DIR/meshmeet.sh"

if [ "$UNINSTALL" = 1 ]; then
  if [ "$LIVE" = 1 ] && command -v systemctl >/dev/null; then
    systemctl disable --now meshmeet 2>/dev/null || true
  fi
  rm -f "$UNIT" "$BIN_DST" "$HOOK"
  if [ "$PURGE" = 1 ]; then rm -rf "$ETC" "$STATE"; fi
  if [ "$LIVE" = 1 ] && command -v systemctl >/dev/null; then systemctl daemon-reload; fi
  echo "meshmeet removed$([ "$PURGE" = 1 ] && echo ", with its config and state" || echo "; config in /etc/meshmeet and state in /var/lib/meshmeet kept")."
  exit 0
fi

[ -n "$DOMAIN" ] || die "usage: install.sh DOMAIN [options] (see --help)"
case "$DOMAIN" in
  *[!A-Za-z0-9.:-]*|-*|'') die "'$DOMAIN' is not a host name or IP address" ;;
esac
for p in "$HTTPS_PORT" "$HTTP_PORT"; do
  case "$p" in ''|*[!0-9]*) die "bad port $p" ;; esac
done
if [ -n "$CERT$KEY" ] && { [ -z "$CERT" ] || [ -z "$KEY" ]; }; then
  die "--cert and --key go together"
fi
[ -z "$CERT" ] || [ -r "$CERT" ] || die "cannot read certificate $CERT"
[ -z "$KEY" ] || [ -r "$KEY" ] || die "cannot read key $KEY"
case "$EMAIL" in
  '') ;;
  *[!A-Za-z0-9.@_+-]*|*@*@*|@*|*@) die "'$EMAIL' is not an e-mail address" ;;
  *@*.*) ;;
  *) die "'$EMAIL' is not an e-mail address" ;;
esac
case "$ACME_DIRECTORY" in
  ''|https://*) ;;
  *) die "--acme-directory must be an https:// URL" ;;
esac
# ACME unless a certificate is given, self-signed is asked for, or DOMAIN cannot
# have one (an IP address, or a name without a dot such as localhost).
ACME=1
if [ -n "$CERT" ] || [ "$SELF_SIGNED" = 1 ]; then ACME=0; fi
case "$DOMAIN" in
  *:*) ACME=0 ;;       # IPv6 address
  *[!0-9.]*) ;;        # a name (not all digits and dots)
  *) ACME=0 ;;         # IPv4 address
esac
case "$DOMAIN" in *.*) ;; *) ACME=0 ;; esac
if [ "$ACME" = 0 ] && [ -n "$EMAIL$ACME_DIRECTORY" ]; then
  die "--email and --acme-directory go with ACME: a DNS name like meet.example.org, without --cert or --self-signed"
fi

# 1. The binary.
if [ -z "$BINARY" ]; then
  command -v cargo >/dev/null || die "cargo not found: install Rust, or pass --binary PATH"
  echo "== building meshmeet (release)"
  (cd "$SRC" && cargo build --release --locked --bin meshmeet)
  BINARY="$SRC/target/release/meshmeet"
fi
[ -x "$BINARY" ] || die "binary $BINARY is not executable"
install -D -m 0755 "$BINARY" "$BIN_DST.new"
mv -f "$BIN_DST.new" "$BIN_DST"

# 2. The service user (a live install only).
if [ "$LIVE" = 1 ] && ! id meshmeet >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/meshmeet --no-create-home \
    --shell /usr/sbin/nologin meshmeet
fi

# 3. Certificates given with --cert/--key: copies the service user can read
#    (certbot keeps its keys readable by root only).
mkdir -p "$ETC"
chmod 0750 "$ETC"
TLS_CERT=""
TLS_KEY=""
if [ -n "$CERT" ]; then
  install -d -m 0750 "$ETC/tls"
  install -m 0644 "$CERT" "$ETC/tls/fullchain.pem"
  install -m 0640 "$KEY" "$ETC/tls/privkey.pem"
  TLS_CERT="/etc/meshmeet/tls/fullchain.pem"
  TLS_KEY="/etc/meshmeet/tls/privkey.pem"
  install -d "$HOOK_DIR"
  cat > "$HOOK" <<HOOK_EOF
#!/bin/sh
# certbot deploy hook: copy the renewed certificate for meshmeet and reload it
# (SIGHUP: new connections get the new certificate, calls are not dropped).
set -e
case "\${RENEWED_DOMAINS:-$DOMAIN}" in *"$DOMAIN"*) ;; *) exit 0 ;; esac
LIVE_DIR="\${RENEWED_LINEAGE:-$(dirname "$CERT")}"
install -m 0644 "\$LIVE_DIR/fullchain.pem" /etc/meshmeet/tls/fullchain.pem
install -m 0640 -g meshmeet "\$LIVE_DIR/privkey.pem" /etc/meshmeet/tls/privkey.pem
systemctl reload meshmeet
HOOK_EOF
  chmod 0755 "$HOOK"
fi

# 4. The config: written once, kept (with its secret) on upgrades.
# set_key SECTION KEY VALUE: replace `KEY = ...` inside [SECTION] ("" = top level).
set_key() {
  local section="$1" key="$2" value="$3" tmp
  tmp="$(mktemp)"
  awk -v sec="$section" -v key="$key" -v val="$value" '
    /^\[/ { cur = $0; gsub(/^\[|\].*$/, "", cur) }
    {
      line = $0
      if (cur == sec && !done && line ~ ("^" key "[ ]*=")) { print key " = " val; done = 1; next }
      print
    }
    END { if (!done) exit 3 }
  ' "$CONF" > "$tmp" || { rm -f "$tmp"; die "cannot set $section.$key in $CONF"; }
  cat "$tmp" > "$CONF"
  rm -f "$tmp"
}

if [ -f "$CONF" ]; then
  echo "== keeping existing $CONF"
else
  echo "== writing $CONF"
  umask 027
  cp "$SRC/config/meshmeet.toml" "$CONF"
  SECRET="$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n' | cut -c1-40)"
  set_key "" data_dir '"/var/lib/meshmeet"'
  set_key http listen "\"0.0.0.0:$HTTPS_PORT\""
  if [ "$HTTP_PORT" != 0 ]; then
    set_key http redirect_listen "\"0.0.0.0:$HTTP_PORT\""
  fi
  set_key http public_host "\"$DOMAIN\""
  if [ -n "$TLS_CERT" ]; then
    set_key tls cert "\"$TLS_CERT\""
    set_key tls key "\"$TLS_KEY\""
  else
    set_key tls self_signed_names "[\"$DOMAIN\"]"
  fi
  if [ "$ACME" = 1 ]; then
    set_key tls acme_domains "[\"$DOMAIN\"]"
    [ -z "$EMAIL" ] || set_key tls acme_email "\"$EMAIL\""
    [ -z "$ACME_DIRECTORY" ] || set_key tls acme_directory "\"$ACME_DIRECTORY\""
    # A CA validates TLS-ALPN-01 on port 443 and HTTP-01 on port 80: off 443, the
    # redirect listener on 80 answers.
    if [ "$HTTPS_PORT" != 443 ] && [ "$HTTP_PORT" = 80 ]; then
      set_key tls acme_challenge '"http-01"'
    fi
  fi
  set_key turn secret "\"$SECRET\""
  set_key turn relay_ports "\"$RELAY_PORTS\""
  # TURN over UDP on the HTTPS port number too (HTTPS uses only TCP there), for
  # networks that let out nothing but port 443; TURN over TCP and TLS share the
  # HTTPS listener itself (turn.share_https_port, on by default).
  set_key turn extra_udp_listen "[\"0.0.0.0:$HTTPS_PORT\"]"
  if [ -n "$EXTERNAL_IP" ]; then
    set_key turn external_ips "[\"$EXTERNAL_IP\"]"
  fi
  chmod 0640 "$CONF"
fi

# 5. The unit.
install -D -m 0644 "$SRC/deploy/meshmeet.service" "$UNIT"
mkdir -p "$STATE"
chmod 0750 "$STATE"

# 6. Validate what was installed.
"$BIN_DST" check-config --config "$CONF" >/dev/null || die "the installed config is invalid: $CONF"

if [ "$LIVE" = 1 ]; then
  chown -R root:meshmeet "$ETC"
  chown meshmeet:meshmeet "$STATE"
  if command -v systemctl >/dev/null && [ "$START" = 1 ]; then
    systemctl daemon-reload
    systemctl enable meshmeet >/dev/null
    systemctl restart meshmeet
    echo "== meshmeet is running: systemctl status meshmeet; journalctl -u meshmeet"
  fi
fi

PORT_SUFFIX=""; [ "$HTTPS_PORT" = 443 ] || PORT_SUFFIX=":$HTTPS_PORT"
CERT_NOTE="self-signed (browsers warn; see --help for a trusted one)"
HTTPS_CHECKS=""
HTTP_CHECKS=""
if [ -n "$TLS_CERT" ]; then
  CERT_NOTE="$TLS_CERT (renewed by certbot's deploy hook)"
elif grep -q '^acme_domains = \["' "$CONF"; then
  CERT_NOTE="ACME: obtained for $DOMAIN within a minute of the start, renewed by the server
          (progress: journalctl -u meshmeet | grep ACME)"
  [ "$HTTPS_PORT" != 443 ] || HTTPS_CHECKS=", the CA's certificate checks"
  [ "$HTTP_PORT" != 80 ] || HTTP_CHECKS=", the CA's certificate checks"
  if [ "$HTTPS_PORT" != 443 ] && [ "$HTTP_PORT" != 80 ]; then
    CERT_NOTE="$CERT_NOTE
          note: the CA checks port 443 or 80; forward one of them to this server"
  fi
fi
RELAY_UFW="${RELAY_PORTS/-/:}"
cat <<DONE

meshmeet is installed.
  Open:   https://$DOMAIN$PORT_SUFFIX/        (diagnostics: https://$DOMAIN$PORT_SUFFIX/check)
  Config: /etc/meshmeet/meshmeet.toml          (then: systemctl restart meshmeet)
  TLS:    $CERT_NOTE
  Logs:   journalctl -u meshmeet -f

Open these ports in the firewall (and in the cloud provider's security group):
  needed:      TCP $HTTPS_PORT (HTTPS$HTTPS_CHECKS, and TURN over TCP and TLS on the same port)
               UDP $RELAY_PORTS (TURN relays)$( [ -n "$HTTP_CHECKS" ] && printf '\n               TCP %s (redirect to HTTPS%s)' "$HTTP_PORT" "$HTTP_CHECKS")
  recommended: UDP $HTTPS_PORT (TURN over UDP on the HTTPS port number)
  optional:    UDP 3478 (STUN/TURN over UDP on the standard port)$( [ "$HTTP_PORT" != 0 ] && [ -z "$HTTP_CHECKS" ] && printf '\n               TCP %s (redirect to HTTPS)' "$HTTP_PORT")
               TCP 3478 (TURN over TCP, only for TURN clients set up by hand)
  Calls connect with TCP $HTTPS_PORT alone (TURN over TLS or TCP on it); UDP is faster.
DONE
if command -v ufw >/dev/null 2>&1; then
  cat <<UFW
ufw is installed; run:
  ufw allow $HTTPS_PORT/tcp
  ufw allow $RELAY_UFW/udp
  ufw allow $HTTPS_PORT/udp
  ufw allow 3478/udp$( [ "$HTTP_PORT" != 0 ] && printf '\n  ufw allow %s/tcp' "$HTTP_PORT")
UFW
fi
