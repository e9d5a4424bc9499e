from medlava.cli import app

app()
