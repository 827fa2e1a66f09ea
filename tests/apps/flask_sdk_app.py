"""The demo app instrumented the way APIToolkit's Flask users do it today: the apitoolkit-flask
SDK's request hooks, publishing each request to Pub/Sub. `cargo xtask bench` compares its cost
with the agent's. Needs APITOOLKIT_KEY, APITOOLKIT_ROOT_URL and PUBSUB_EMULATOR_HOST."""
import os

from apitoolkit_flask import APIToolkit

from flask_app import app

apitoolkit = APIToolkit(api_key=os.environ["APITOOLKIT_KEY"], root_url=os.environ["APITOOLKIT_ROOT_URL"])


# The hooks as the SDK's README wires them: afterRequest publishes and returns nothing.
@app.before_request
def before_request():
    apitoolkit.beforeRequest()


@app.after_request
def after_request(response):
    apitoolkit.afterRequest(response)
    return response
