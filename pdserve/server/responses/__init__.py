"""OpenAI's Responses API (`/v1/responses`) for text models, over the chat path.

request.py       the body, validated; what is refused and why
conversation.py  a request (and a stored conversation) as the chat request it amounts to
output.py        output items assembled from a reply, with their stream events (events.py)
objects.py       the Response object and its items, in the `openai` package's shapes
store.py         stored responses: a bounded LRU in memory (GET, previous_response_id)
endpoint.py      POST /v1/responses, GET /v1/responses/{response_id}
"""
