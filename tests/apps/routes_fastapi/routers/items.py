from fastapi import APIRouter

router = APIRouter(prefix="/items")


# Declared first: Starlette takes the first route that matches.
@router.get("/special")
async def special():
    return {"item": "special"}


@router.get("/{item_id}")
async def read_item(item_id: int):
    return {"item": item_id}


@router.get("/{item_id:int}/photos/{rest:path}")
async def photo(item_id: int, rest: str):
    return {"item": item_id, "photo": rest}
