import pg8000.native
from fix_pg import APP_PASSWORD, APP_USER, SHOP_DB


def test_server_accepts_password_login_and_logs_statements(pg):
    mark = pg.log_position()
    conn = pg8000.native.Connection(APP_USER, host=pg.host, port=pg.port, database=SHOP_DB, password=APP_PASSWORD)
    assert conn.run("SELECT count(*) FROM customers") == [[5]]
    conn.close()
    assert "SELECT count(*) FROM customers" in pg.log_since(mark)
