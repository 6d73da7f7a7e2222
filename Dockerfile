# mailsplice: build the TypeScript, then ship only the compiled code and runtime packages.
FROM node:20-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci
COPY tsconfig.json ./
COPY src ./src
RUN npm run build && npm prune --omit=dev

FROM node:20-bookworm-slim
# openssl: first-start.sh makes a self-signed certificate and an admin token when none is mounted.
RUN apt-get update && apt-get install -y --no-install-recommends openssl && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/mailsplice
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY package.json ./
COPY deploy/docker/entrypoint.sh deploy/docker/first-start.sh ./
# The image's config starts as it is (test/packaging.test.ts checks it with check-config):
# listeners on 0.0.0.0, unprivileged ports, the embedded lookup with an empty routes file.
COPY deploy/docker/mailsplice.yaml deploy/docker/routes.yaml /etc/mailsplice/
RUN chown -R node:node /etc/mailsplice
USER node
# IMAP, IMAPS, POP3, POP3S, LMTP (keep it off the internet: no authentication), admin.
EXPOSE 1143 1993 1110 1995 2424 9143
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s \
  CMD ["node", "/opt/mailsplice/dist/cli.js", "healthcheck", "--config", "/etc/mailsplice/mailsplice.yaml"]
ENTRYPOINT ["/opt/mailsplice/entrypoint.sh"]
CMD ["serve", "--config", "/etc/mailsplice/mailsplice.yaml"]
