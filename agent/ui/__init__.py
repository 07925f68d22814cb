"""The dashboard's static files (index.html, app.js, app.css), served by `agent.api.ui`; kept
in the package so the wheel and the zipapp carry them."""
