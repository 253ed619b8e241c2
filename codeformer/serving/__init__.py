"""What only the Cog side needs: the request (inputs to JPGs), fetching, the schema, the local server.

The pipeline (``codeformer.pipeline`` and its stages) knows nothing of Cog or HTTP; these
modules turn a Cog request into arrays for it and its results into files.
"""
