from flask import Blueprint, jsonify

accounts = Blueprint("accounts", __name__, url_prefix="/accounts")


@accounts.get("/<int:account_id>")
def account(account_id):
    return jsonify(account=account_id)


@accounts.get("/<int:account_id>/files/<path:name>")
def account_file(account_id, name):
    return jsonify(account=account_id, file=name)


@accounts.get("/rates/<float:rate>")
def rate(rate):
    return jsonify(rate=rate)
