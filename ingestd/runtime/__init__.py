"""The process around the app: the daemon (signals, drain), the supervisor and
its worker processes, their IPC, systemd notify, TLS, logging."""
