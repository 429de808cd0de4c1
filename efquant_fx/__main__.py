from efquant_fx.cli import app

app(prog_name="efquant-fx")
