from django.http import JsonResponse


def article(request, pk):
    return JsonResponse({"article": pk})


def by_slug(request, slug):
    return JsonResponse({"slug": slug})


def latest(request):
    return JsonResponse({"article": "latest"})


def archive(request, year):
    return JsonResponse({"year": year})
