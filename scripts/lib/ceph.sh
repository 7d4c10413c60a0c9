# A single-node Ceph cluster for scripts/quickstart --backend rbd. Source it;
# do not run it.
#
# The same cluster testkit's CephCluster starts for the tests
# (testkit/src/ceph.rs), step for step, in the manner of go-ceph's
# micro-osd.sh: one monitor, one OSD on the `memstore` object store (the data
# lives in the OSD's memory, up to CEPH_MEMSTORE_BYTES, and is gone when it
# stops), one manager with only the modules it always runs, cephx on, bound to
# loopback, pool size 1; conf, keyrings, logs and the monitor's store under
# one directory. Unlike the tests' cluster, its daemons outlive the script
# (their pids in DIR/run/*.pid) until ceph_stop.

CEPH_MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-$((2 << 30))}
CEPH_MGR_MODULES=(mgr_module.py mgr_util.py balancer crash devicehealth orchestrator
  pg_autoscaler progress rbd_support status telemetry volumes)

# ceph_running DIR: true when the cluster's three daemons are alive.
ceph_running() {
  local d
  for d in mon.a osd.0 mgr.x; do
    [[ -f $1/run/$d.daemon-pid ]] && kill -0 "$(cat "$1/run/$d.daemon-pid")" 2>/dev/null || return 1
  done
}

# ceph_start DIR V2_PORT V1_PORT: makes the cluster in DIR (which must not
# hold one) and waits until its OSD is up and its manager available.
ceph_start() {
  local dir=$1 v2=$2 v1=$3 m
  mkdir -p "$dir"/{mon,osd,mgr,run,log,crash,mgr-modules}
  for m in "${CEPH_MGR_MODULES[@]}"; do
    ln -sfn "/usr/share/ceph/mgr/$m" "$dir/mgr-modules/$m"
  done
  local fsid mons
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mons="[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]"
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = $mons
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $dir/\$name.keyring
run dir = $dir/run
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon osd down out interval = 0
osd objectstore = memstore
memstore device bytes = $CEPH_MEMSTORE_BYTES
osd data = $dir/osd
mgr data = $dir/mgr
mgr module path = $dir/mgr-modules
mgr initial modules = status
mon data = $dir/mon
[mon.a]
keyring = $dir/mon/keyring
admin socket = $dir/run/mon.a.asok
[osd.0]
keyring = $dir/osd/keyring
admin socket = $dir/run/osd.0.asok
[mgr.x]
keyring = $dir/mgr/keyring
admin socket = $dir/run/mgr.x.asok
EOF
  local conf=$dir/ceph.conf
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "$mons" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
  ceph_daemon "$dir" mon.a ceph-mon -c "$conf" -f -i a
  # Clones without snapshot protection (clone format 2) need mimic clients.
  ceph -c "$conf" osd set-require-min-compat-client mimic >/dev/null
  ceph -c "$conf" osd create >/dev/null
  ceph -c "$conf" auth get-or-create osd.0 mon 'allow profile osd' mgr 'allow profile osd' \
    osd 'allow *' -o "$dir/osd/keyring" >/dev/null
  ceph-osd -c "$conf" -i 0 --mkfs 2>>"$dir/log/ceph-osd.out"
  ceph_daemon "$dir" osd.0 ceph-osd -c "$conf" -f -i 0
  ceph -c "$conf" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' \
    -o "$dir/mgr/keyring" >/dev/null
  ceph_daemon "$dir" mgr.x ceph-mgr -c "$conf" -f -i x
  local i
  for i in $(seq 120); do
    ceph -c "$conf" osd stat --format json 2>/dev/null | grep -q '"num_up_osds":1' &&
      ceph -c "$conf" mgr stat --format json 2>/dev/null | grep -q '"available":true' && return 0
    sleep 0.5
  done
  echo "the Ceph cluster in $dir did not come up in 60 s; logs in $dir/log" >&2
  tail -n 5 "$dir"/log/*.out >&2 || true
  return 1
}

# ceph_daemon DIR NAME PROGRAM ARGS...: runs a daemon in the foreground of a
# background job, its output in DIR/log/PROGRAM.out, its pid recorded.
ceph_daemon() {
  local dir=$1 name=$2
  shift 2
  setsid "$@" </dev/null >>"$dir/log/$1.out" 2>&1 &
  echo $! >"$dir/run/$name.daemon-pid"
}

# ceph_pool DIR POOL: a replicated RBD pool (8 PGs: one OSD).
ceph_pool() {
  ceph -c "$1/ceph.conf" osd pool create "$2" 8 8 >/dev/null 2>&1
  rbd -c "$1/ceph.conf" pool init "$2"
}

# ceph_rbd_user DIR NAME POOL: a cephx user limited to RBD in POOL (the caps
# the Ceph docs give an RBD client), its keyring DIR/client.NAME.keyring, 0600.
ceph_rbd_user() {
  local k=$1/client.$2.keyring
  (umask 077 && ceph -c "$1/ceph.conf" auth get-or-create "client.$2" mon 'profile rbd' \
    osd "profile rbd pool=$3" mgr "profile rbd pool=$3" -o "$k" >/dev/null)
}

# ceph_stop DIR: kills the daemons (manager, OSD, monitor) and removes DIR:
# memstore's data went with the OSD.
ceph_stop() {
  local dir=$1 d p
  for d in mgr.x osd.0 mon.a; do
    [[ -f $dir/run/$d.daemon-pid ]] || continue
    p=$(cat "$dir/run/$d.daemon-pid")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$dir"
}
