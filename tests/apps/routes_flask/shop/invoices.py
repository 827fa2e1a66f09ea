from flask import Blueprint, jsonify

# The prefix given when the app registers it (/billing) replaces this one, as in Flask.
bp = Blueprint("invoices", __name__, url_prefix="/unused")


@bp.put("/invoices/<ref>")
def put_invoice(ref):
    return jsonify(invoice=ref)


@bp.get("/invoices/<uuid:invoice_id>")
def invoice_by_id(invoice_id):
    return jsonify(invoice=str(invoice_id))
