# mailsplice: build the TypeScript, then ship only the compiled code and runtime packages.
FROM node:20-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci
COPY tsconfig.json ./
COPY src ./src
RUN npm run build && npm prune --omit=dev

FROM node:20-bookworm-slim
WORKDIR /opt/mailsplice
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY package.json ./
COPY deploy/mailsplice.example.yaml /etc/mailsplice/mailsplice.yaml
USER node
EXPOSE 143 993 110 995 24 9143
ENTRYPOINT ["node", "/opt/mailsplice/dist/cli.js"]
CMD ["serve", "--config", "/etc/mailsplice/mailsplice.yaml"]
