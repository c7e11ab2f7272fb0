#!/bin/busybox sh
# PID 1 of the NovaCron test guest: mount the basics, then run the workload on
# the serial console with the settings given on the kernel command line
# (novacron.mem_mb=, novacron.rate_mb=, novacron.verify_s=). With novacron.ip=
# (address/prefix) the first NIC gets that address and a TCP echo service
# listens on novacron.port= (default 7000). The ACPI power button (QMP
# system_powerdown) shuts the guest down cleanly and says so on the console,
# unless novacron.power_button=ignore (a guest that ignores it, for tests).
# novacron.flood_kb=N prints N KiB of filler lines on the console (serial
# history tests), then NOVACRON-FLOOD-DONE.
# novacron.softdirty_check=1 first runs the soft-dirty reader check (prints
# NOVACRON-SOFTDIRTY ...).
# novacron.profile=random|realistic picks what the workload's memory holds (workload.c);
# realistic also checks the page cache of the files under /pagecache, which only the
# realistic initrd (initrd-realistic.img, see build.py) carries.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mem_mb=32
rate_mb=4
verify_s=4
profile=random
ip_cidr=
port=7000
power_button=handle
flood_kb=
for word in $(cat /proc/cmdline); do
    case "$word" in
        novacron.mem_mb=*) mem_mb="${word#*=}" ;;
        novacron.rate_mb=*) rate_mb="${word#*=}" ;;
        novacron.verify_s=*) verify_s="${word#*=}" ;;
        novacron.profile=*) profile="${word#*=}" ;;
        novacron.ip=*) ip_cidr="${word#*=}" ;;
        novacron.port=*) port="${word#*=}" ;;
        novacron.power_button=*) power_button="${word#*=}" ;;
        novacron.flood_kb=*) flood_kb="${word#*=}" ;;
        novacron.softdirty_check=1) /bin/softdirty-check ;;  # the engine's soft-dirty reader, on this kernel
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
if [ "$power_button" = handle ]; then
    # button.ko reports the ACPI power button as KEY_POWER on an input device (evdev.ko);
    # busybox acpid reads it and runs /etc/acpi/PWRF/00000080
    for mod in /lib/power/*.ko; do insmod "$mod" || echo "NOVACRON-POWER insmod failed: $mod"; done
    mkdir -p /etc/acpi/PWRF
    # The markers go through printk (<2>: shown despite loglevel=3), written out at once,
    # where a tty write could still sit in a buffer when the power goes.
    {
        echo '#!/bin/sh'
        echo 'echo "<2>NOVACRON-POWER button pressed: stopping processes" >/dev/kmsg'
        echo 'kill -TERM -1'
        echo 'sync'
        echo 'echo "<2>NOVACRON-POWEROFF clean" >/dev/kmsg'
        echo 'poweroff -f'
    } >/etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    acpid -c /etc/acpi -l /dev/null -p /tmp/acpid.pid
    echo "NOVACRON-POWER button=handle"
fi
if [ -n "$flood_kb" ]; then
    (
        line="NOVACRON-FLOOD $(head -c 1000 /dev/zero | tr '\0' x)"
        i=0
        while [ "$i" -lt "$flood_kb" ]; do echo "$i $line"; i=$((i + 1)); done
        echo "NOVACRON-FLOOD-DONE kb=$flood_kb"
    ) >/dev/console 2>&1 &
fi
[ -x /bin/disk-init ] && /bin/disk-init  # the disk workload, with novacron.disk= (disk.sh)
files=
[ "$profile" = realistic ] && [ -d /pagecache ] && files="--files /pagecache"
echo "NOVACRON-INIT mem_mb=$mem_mb rate_mb=$rate_mb verify_s=$verify_s profile=$profile"
# shellcheck disable=SC2086 # $files is two words or none
/bin/workload --mem-mb "$mem_mb" --rate-mb "$rate_mb" --verify-s "$verify_s" --profile "$profile" $files \
    </dev/console >/dev/console 2>&1
echo "NOVACRON-WORKLOAD-EXIT status=$?"
# PID 1 must not exit (the kernel would panic); keep the guest up for inspection.
while true; do sleep 3600; done
