from conftest import FORM, wattmon_form


async def test_wattmon_block_is_stored(client, tmp_path):
    data = "Time,V\n2026-11-21 08:00:00,230\n"
    resp = await client.post("/wattmon", data=wattmon_form("00:11:22:33:44:55", data), headers=FORM)
    assert resp.status == 200
    assert await resp.text() == "OK"
    stored = tmp_path / "data" / "wattmon" / "001122334455" / "2026-11-21.csv"
    assert stored.read_text() == data
