"""`hsmkms dev` keeps its directory, configuration (it holds the dev secret), metadata and
SoftHSM2 configuration private to its user."""

from __future__ import annotations

import stat


def test_dev_files_are_private_to_their_owner(server):
    data = server.data_dir
    server.client().create_key()  # the metadata has been written to
    want = {data: 0o700}
    for name in ("hsmkms.toml", "metadata.db", "metadata.db-wal", "metadata.db-shm",
                 "softhsm2.conf", "so.pin", "user.pin"):
        if (data / name).exists() or not name.startswith("metadata.db-"):
            want[data / name] = 0o600
    got = {p: stat.S_IMODE(p.stat().st_mode) for p in want}
    loose = {str(p): oct(m) for p, m in got.items() if m != want[p]}
    assert not loose, f"modes other than 0600 (files) / 0700 (directory): {loose}"
