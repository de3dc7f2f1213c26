"""caiosfs benchmark: caiosfs vs rclone mount vs s3fs vs raw boto3 on a loopback SeaweedFS.

Entry point: ``bench/run`` (see bench/README.md). The modules:

- ``main``      command line, the run loop (interleaving systems and repetitions), exit status
- ``scale``     every size and count of a run, scaled by ``--quick`` / ``--size-scale``
- ``store``     the S3 server (SeaweedFS via ``caiosfs.seaweed``), seeding, durability polling
- ``systems``   one adapter per system: mount / unmount / "wait until durable" / daemon pids
- ``workloads`` the workloads, one small function per (workload, kind of system)
- ``worker``    the measured operations, run in a child process so a hung mount can be killed
- ``procs``     processes: bounded runs, page-cache drop, forced unmount, RSS sampling
- ``wanproxy``  an optional loopback TCP proxy adding first-byte delay and a bandwidth cap
- ``report``    statistics, JSON, Markdown and the PNG chart
"""
