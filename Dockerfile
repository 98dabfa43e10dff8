# The hast image for the cluster scripts in deploy/ (deploy/README.md): the CPU build of `hast` and
# deploy/point.sh. Build from the repository root:  docker build -t hast:latest .
# Both stages are the same Ubuntu 24.04 (the .NET 10 images' default), whose libstdc++ is new enough for
# TorchSharp's native library: the build's libstdc++ step (build/LibstdcxxCompat.targets) does nothing there.
FROM mcr.microsoft.com/dotnet/sdk:10.0-noble AS build
WORKDIR /src
COPY . .
RUN dotnet publish src/Hast.App -c Release -o /app

FROM mcr.microsoft.com/dotnet/runtime:10.0-noble
COPY --from=build /app /app
COPY deploy/point.sh /app/deploy/point.sh
RUN ln -s /app/hast /usr/local/bin/hast && chmod +x /app/deploy/point.sh
# the convolution self-check's verdicts are kept per machine (CPU model and features) under HAST_CACHE:
# on the shared volume every node of a kind checks once
ENV HAST=hast HAST_CACHE=/data/cache DOTNET_CLI_TELEMETRY_OPTOUT=1
WORKDIR /data
ENTRYPOINT ["hast"]
