"""The machine stage: backends that boot a systemd, their images and cgroups, the systemd D-Bus client, and
probe batches run on a machine."""
