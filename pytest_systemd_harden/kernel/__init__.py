"""Facts about Linux every stage may use: capability and namespace tables, syscall numbers, the kernel's
seccomp evidence."""
