"""Falcon resources, one file per endpoint family. Each translates between
HTTP and the engine client; validation lives in `server.schemas`, errors in
`server.errors`."""
