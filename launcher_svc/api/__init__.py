"""The LauncherService servicer: protobuf in, core calls, protobuf out."""
