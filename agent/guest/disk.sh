#!/bin/busybox sh
# The test guest's disk workload (started by init.sh when the kernel command line
# has novacron.disk=DEV): load virtio-blk and virtio-scsi, wait for the disks, then run diskload on
# the serial console in the background. novacron.disk_ref=DEV adds a reference disk
# written first; novacron.disk_rate_kb=, novacron.disk_verify_s=, novacron.disk_blocks=.
dev=
ref=
rate_kb=256
verify_s=3
blocks=2048
for word in $(cat /proc/cmdline); do
    case "$word" in
        novacron.disk=*) dev="${word#*=}" ;;
        novacron.disk_ref=*) ref="${word#*=}" ;;
        novacron.disk_rate_kb=*) rate_kb="${word#*=}" ;;
        novacron.disk_verify_s=*) verify_s="${word#*=}" ;;
        novacron.disk_blocks=*) blocks="${word#*=}" ;;
    esac
done
[ -n "$dev" ] || exit 0
for mod in /lib/modules/disk/*.ko; do
    name="${mod##*/}"; name="${name#*-}"; name="${name%.ko}"; name="${name//-/_}"  # sysfs: crc_t10dif
    [ -d "/sys/module/$name" ] || insmod "$mod" || echo "NOVACRON-DISK-ERROR insmod failed: $mod"
done
n=0
while { [ ! -b "/dev/$dev" ] || { [ -n "$ref" ] && [ ! -b "/dev/$ref" ]; }; } && [ "$n" -lt 100 ]; do
    sleep 0.1; n=$((n + 1))
done
set -- --dev "/dev/$dev" --rate-kb "$rate_kb" --verify-s "$verify_s" --blocks "$blocks"
[ -n "$ref" ] && set -- "$@" --ref "/dev/$ref"
/bin/diskload "$@" </dev/null >/dev/console 2>&1 &
