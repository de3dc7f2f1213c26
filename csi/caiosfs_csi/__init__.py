"""caiosfs CSI node plugin: mounts an S3 prefix into a Kubernetes pod with `caiosfs mount`.

The plugin never imports caiosfs itself; it drives the `caiosfs` command, so that the FUSE
daemons it starts live in their own sessions and outlive the plugin process.
"""

__version__ = "0.1.0"

DEFAULT_DRIVER_NAME = "csi.caiosfs.io"
