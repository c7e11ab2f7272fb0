#!/bin/busybox sh
# PID 1 of the NovaCron test guest: mount the basics, then run the workload on
# the serial console with the settings given on the kernel command line
# (novacron.mem_mb=, novacron.rate_mb=, novacron.verify_s=). With novacron.ip=
# (address/prefix) the first NIC gets that address and a TCP echo service
# listens on novacron.port= (default 7000).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mem_mb=32
rate_mb=4
verify_s=4
ip_cidr=
port=7000
for word in $(cat /proc/cmdline); do
    case "$word" in
        novacron.mem_mb=*) mem_mb="${word#*=}" ;;
        novacron.rate_mb=*) rate_mb="${word#*=}" ;;
        novacron.verify_s=*) verify_s="${word#*=}" ;;
        novacron.ip=*) ip_cidr="${word#*=}" ;;
        novacron.port=*) port="${word#*=}" ;;
    esac
done
if [ -n "$ip_cidr" ]; then
    for mod in /lib/modules/*.ko; do insmod "$mod" || echo "NOVACRON-NET insmod failed: $mod"; done
    ip link set lo up
    # the NIC appears once virtio_net has probed it
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    ip addr add "$ip_cidr" dev eth0 && ip link set eth0 up
    # one "cat" per connection: every line sent comes straight back
    nc -ll -p "$port" -e /bin/cat </dev/null >/dev/null 2>&1 &
    mac=$(cat /sys/class/net/eth0/address 2>/dev/null)
    echo "NOVACRON-NET ip=$ip_cidr port=$port mac=$mac"
fi
[ -x /bin/disk-init ] && /bin/disk-init  # the disk workload, with novacron.disk= (disk.sh)
echo "NOVACRON-INIT mem_mb=$mem_mb rate_mb=$rate_mb verify_s=$verify_s"
/bin/workload --mem-mb "$mem_mb" --rate-mb "$rate_mb" --verify-s "$verify_s" </dev/console >/dev/console 2>&1
echo "NOVACRON-WORKLOAD-EXIT status=$?"
# PID 1 must not exit (the kernel would panic); keep the guest up for inspection.
while true; do sleep 3600; done
