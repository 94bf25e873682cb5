"""Who sees what of the tokens: unauthenticated /healthz gives states only; DescribeCustomKeyStores
gives module paths, serials and errors (with CKR_ codes) to admin principals only."""

from __future__ import annotations

import json
import time

from e2e_support import raw_request

APP_KEY, APP_SECRET = "AKIAHSMKMSAPP0000001", "app-secret-key-for-the-test"
DETAILS = ("serial", "lasterror", "module", "manufacturer", "model", "hsmkmsconnectionerror",
           "/usr/lib", "ckr_")


def details_in(text: str) -> list[str]:
    low = text.lower()
    return [d for d in DETAILS if d in low]


def test_health_shows_states_and_only_admins_see_token_details(fresh_server):
    srv = fresh_server
    config = srv.data_dir / "hsmkms.toml"
    config.write_text(config.read_text() + f'\n[[principals]]\nname = "app"\naccess_key_id = "{APP_KEY}"\n'
                                           f'secret_access_key = "{APP_SECRET}"\n')
    srv.restart()
    # The token goes away, so that there is an error (with its CKR_ code) to show or hide.
    srv.lose_token(1)
    deadline = time.monotonic() + 30
    while srv.token_states().get("hsmkms-dev") != "DOWN":
        assert time.monotonic() < deadline, srv.health()
        time.sleep(0.5)
    health = srv.health()
    assert health["tokens"] == [{"label": "hsmkms-dev", "state": "DOWN"}], health
    assert health["keyStores"][0]["connectionState"] in ("CONNECTED", "FAILED"), health
    assert not details_in(json.dumps(health)), f"/healthz shows {details_in(json.dumps(health))}: {health}"

    admin = raw_request(srv.endpoint, "DescribeCustomKeyStores", {})
    assert admin.status == 200, admin
    token = admin.json()["CustomKeyStores"][0]["HsmkmsTokens"][0]
    assert token["Module"].startswith("/") and token["Serial"] and "CKR_" in token["LastError"], token

    app = raw_request(srv.endpoint, "DescribeCustomKeyStores", {}, access_key=APP_KEY,
                      secret_key=APP_SECRET)
    assert app.status == 200, app
    store = app.json()["CustomKeyStores"][0]
    assert store["CustomKeyStoreId"] and store["CustomKeyStoreName"] == "dev", store
    assert store["ConnectionState"] and store["HsmkmsTokens"] == [
        {"Label": "hsmkms-dev", "State": "DOWN"}], store
    assert not details_in(app.body.decode()), f"a non-admin sees {details_in(app.body.decode())}"
