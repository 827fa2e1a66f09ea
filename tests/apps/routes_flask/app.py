"""Flask app whose routes the agent reads from its source: a blueprint mounted with a prefix,
converters, and a static route next to a parameter (`/users/me` vs `/users/<user_id>`)."""
import sys

from flask import Flask, jsonify, request

from shop import invoices
from shop.accounts import accounts as accounts_blueprint

app = Flask(__name__)
app.register_blueprint(accounts_blueprint)
app.register_blueprint(invoices.bp, url_prefix="/billing")


@app.get("/users/<user_id>")
def user(user_id):
    return jsonify(user=user_id)


@app.get("/users/me")
def me():
    return jsonify(user="me")


@app.get("/plain")
def plain():
    return jsonify(args=request.args.to_dict())


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
