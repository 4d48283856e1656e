#!/usr/bin/env bash
# What each part of the wake-up trigger costs writers (docs/performance.md, "The producer
# ratio, measured in turns"). A throwaway PostgreSQL (fsync on) on every CPU, the schema
# from `pgpushd migrate`, the awake deadline held ahead (writers skip NOTIFY, as while a
# daemon is awake), and 8 pgbench clients of single-row INSERTs into the outbox, with each
# trigger variant in turn, CYCLES times (6) for SECS seconds (8) each:
#   none   no trigger
#   full   the shipped trigger (pgpushd.notify_outbox)
#   lock   only its shared advisory lock
#   seq    only its deadline read
#   empty  a PL/pgSQL statement trigger that does nothing
#   before the shipped trigger as a BEFORE statement trigger (no after-trigger queue)
#   empty_before  the empty one, BEFORE
# Prints each round's tps, then each variant's median ratio to `none` over the cycles.
#
#   cargo build --release && benches/trigger_parts.sh
set -euo pipefail

CYCLES=${CYCLES:-6}
SECS=${SECS:-8}
PORT=${PORT:-55499}
top=$(cd "$(dirname "$0")/.." && pwd)
pgpushd="$top/target/release/pgpushd"
[ -x "$pgpushd" ] || { echo "build first: cargo build --release" >&2; exit 1; }
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$bin" ] || bin=$(dirname "$(command -v initdb)")

work=$(mktemp -d /tmp/pgpushd-trigger-parts-XXXXXX)
as_owner=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$work"
    as_owner=(runuser -u postgres --)
fi
cleanup() {
    "${as_owner[@]}" "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"${as_owner[@]}" "$bin/initdb" -D "$work/data" -U postgres -A trust >/dev/null
"${as_owner[@]}" "$bin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
    -o "-p $PORT -k $work -c listen_addresses=127.0.0.1 -c shared_buffers=256MB" start >/dev/null
printf '[database]\nurl = "postgres://postgres@127.0.0.1:%s/postgres"\n' "$PORT" >"$work/pgpushd.toml"
"$pgpushd" migrate --config "$work/pgpushd.toml" >/dev/null

psql=(psql -h "$work" -p "$PORT" -U postgres -d postgres -q -X -v ON_ERROR_STOP=1)
"${psql[@]}" >/dev/null <<'SQL'
SELECT setval('pgpushd.awake_until',
              (extract(epoch FROM clock_timestamp()) * 1000)::bigint + 36000000, true);
CREATE FUNCTION pgpushd.part_empty() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RETURN NULL; END $$;
CREATE FUNCTION pgpushd.part_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(1885827189, 2002873189) THEN
        PERFORM pg_notify('pgpushd_outbox', '');
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION pgpushd.part_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('pgpushd.awake_until'), 0)
       < (extract(epoch FROM clock_timestamp()) * 1000)::bigint THEN
        PERFORM pg_notify('pgpushd_outbox', '');
    END IF;
    RETURN NULL;
END $$;
SQL
trigger=$("${psql[@]}" -At -c "SELECT tgname FROM pg_trigger
                                WHERE tgrelid = 'pgpushd.outbox'::regclass AND NOT tgisinternal")
cat >"$work/insert.sql" <<'SQL'
INSERT INTO pgpushd.outbox (device_token, payload)
VALUES (md5(random()::text) || md5(random()::text), '{"aps":{"alert":"producer"}}');
SQL

variants=(${VARIANTS:-none full lock seq empty before empty_before})
results="$work/results"
for cycle in $(seq 1 "$CYCLES"); do
    # Each cycle starts one variant later, so no variant always runs first.
    for i in "${!variants[@]}"; do
        v=${variants[$(( (i + cycle - 1) % ${#variants[@]} ))]}
        "${psql[@]}" -c "DROP TRIGGER IF EXISTS $trigger ON pgpushd.outbox" 2>/dev/null
        "${psql[@]}" -c "TRUNCATE pgpushd.outbox"
        timing=AFTER
        case $v in
            none) ;;
            full) fn=pgpushd.notify_outbox ;;
            before) fn=pgpushd.notify_outbox timing=BEFORE ;;
            empty_before) fn=pgpushd.part_empty timing=BEFORE ;;
            *) fn=pgpushd.part_$v ;;
        esac
        if [ "$v" != none ]; then
            "${psql[@]}" -c "CREATE TRIGGER $trigger $timing INSERT ON pgpushd.outbox
                             FOR EACH STATEMENT EXECUTE FUNCTION $fn()"
        fi
        "${psql[@]}" -c "CHECKPOINT"
        tps=$("$bin/pgbench" -h "$work" -p "$PORT" -U postgres -n -M prepared -c 8 -j 2 \
                  -T "$SECS" -f "$work/insert.sql" postgres 2>/dev/null \
              | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1)
        echo "cycle $cycle  $v  $tps tps"
        echo "$cycle $v $tps" >>"$results"
    done
done

python3 - "$results" <<'PY'
import collections, statistics, sys
cycles = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    cycle, variant, tps = line.split()
    cycles[cycle][variant] = float(tps)
variants = [v for v in next(iter(cycles.values())) if v != "none"]
for variant in variants:
    ratios = [c[variant] / c["none"] for c in cycles.values()]
    print(f"{variant:6} {statistics.median(ratios):.2f} of no trigger "
          f"(cycles {min(ratios):.2f} to {max(ratios):.2f})")
PY
