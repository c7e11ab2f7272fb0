#!/bin/busybox sh
# PID 1 of the NovaCron test guest: mount the basics, then run the workload on
# the serial console with the settings given on the kernel command line
# (novacron.mem_mb=, novacron.rate_mb=, novacron.verify_s=).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mem_mb=32
rate_mb=4
verify_s=4
for word in $(cat /proc/cmdline); do
    case "$word" in
        novacron.mem_mb=*) mem_mb="${word#*=}" ;;
        novacron.rate_mb=*) rate_mb="${word#*=}" ;;
        novacron.verify_s=*) verify_s="${word#*=}" ;;
    esac
done
echo "NOVACRON-INIT mem_mb=$mem_mb rate_mb=$rate_mb verify_s=$verify_s"
/bin/workload --mem-mb "$mem_mb" --rate-mb "$rate_mb" --verify-s "$verify_s" </dev/console >/dev/console 2>&1
echo "NOVACRON-WORKLOAD-EXIT status=$?"
# PID 1 must not exit (the kernel would panic); keep the guest up for inspection.
while true; do sleep 3600; done
