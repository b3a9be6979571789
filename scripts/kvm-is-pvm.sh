#!/usr/bin/env bash
# Exits 0 when this host's /dev/kvm is PVM (kvm_pvm, no VMX/SVM): a KVM that
# cannot run a stock Linux guest (README, "Hosts with PVM").
[ -d /sys/module/kvm_pvm ] && ! grep -qw -e vmx -e svm /proc/cpuinfo
